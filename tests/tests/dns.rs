//! Service discovery on the lab, asked with real `dig` and glibc (`getent`) from inside the
//! tasks' own network and mount namespaces (their resolv.conf says 127.0.0.11).
//! Needs root and `dig`; fails with a message saying so without them.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use swarmnet_lab::{in_task, wait_for, Lab};

const T: Duration = Duration::from_secs(30);
/// Debian puts dnsmasq in /usr/sbin, which a non-login root shell may not have on PATH.
const DNSMASQ: &str = "/usr/sbin/dnsmasq";
const SLEEP: &[&str] = &["sleep", "3600"];

fn pid(t: &Value) -> u32 {
    t["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).expect("running task has a pid")
}

fn need_dig() -> Result<()> {
    if Command::new("dig").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        bail!("these tests need dig (apt install bind9-dnsutils; .ci/setup does it)");
    }
    Ok(())
}

/// `dig +short` from inside task `pid`, as a set of lines.
fn short(pid: u32, args: &[&str]) -> Result<BTreeSet<String>> {
    let mut a = vec!["dig", "+short", "+time=3", "+tries=1"];
    a.extend_from_slice(args);
    Ok(in_task(pid, &a)?.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect())
}

/// The whole `dig` answer from inside task `pid`.
fn dig(pid: u32, args: &[&str]) -> Result<String> {
    let mut a = vec!["dig", "+time=3", "+tries=1"];
    a.extend_from_slice(args);
    in_task(pid, &a)
}

fn status(answer: &str) -> &str {
    answer.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("none")
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn addrs(tasks: &[Value], net: &str) -> BTreeSet<String> {
    tasks.iter().filter_map(|t| t["addresses"][net].as_str().map(str::to_string)).collect()
}

fn vip(lab: &Lab, svc: &str, net: &str) -> Result<String> {
    let v: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", svc])?)?;
    v["vips"][net].as_str().map(str::to_string).with_context(|| format!("service {svc} has no VIP on {net}: {v}"))
}

/// A lab of `nodes` nodes with the DNS flags every test here uses plus `extra`, and an
/// overlay network `appnet`.
fn dns_lab(name: &str, nodes: usize, extra: &[&str]) -> Result<Lab> {
    need_dig()?;
    let mut args = vec!["--dns-search", "."];
    args.extend_from_slice(extra);
    let lab = Lab::up_full(name, nodes, nodes, 1.0, &[], &args)?;
    lab.cli_ok(0, &["network", "create", "--driver", "overlay", "--attachable", "appnet"])?;
    Ok(lab)
}

/// `service create --name NAME --replicas N ARGS… -- sleep 3600`.
fn sleeper(lab: &Lab, name: &str, replicas: &str, args: &[&str]) -> Result<()> {
    let mut a = vec!["service", "create", "--name", name, "--replicas", replicas];
    a.extend_from_slice(args);
    a.push("--");
    a.extend_from_slice(SLEEP);
    lab.cli_ok(0, &a)?;
    Ok(())
}

/// Waits until `tasks.<svc>` asked from `pid` lists exactly `want`.
fn wait_tasks(pid: u32, svc: &str, want: &BTreeSet<String>) -> Result<()> {
    let q = format!("tasks.{svc}");
    let mut last = BTreeSet::new();
    wait_for(&format!("{q} = {want:?}"), T, || {
        last = short(pid, &[&q]).ok()?;
        (last == *want).then_some(())
    })
    .with_context(|| format!("last answer {last:?}"))
}

#[test]
fn names_vips_tasks_dnsrr_aliases_ptr_srv_and_scoping() -> Result<()> {
    let node_resolv_before = std::fs::read("/etc/resolv.conf").ok();
    let lab = dns_lab("snx-dns", 3, &["--dns-ttl", "7"])?;
    lab.cli_ok(0, &["network", "create", "--driver", "overlay", "--attachable", "othernet"])?;
    sleeper(&lab, "web", "3", &["--network", "name=appnet,alias=api", "--publish", "8080:80"])?;
    sleeper(&lab, "db", "2", &["--endpoint-mode", "dnsrr", "--network", "appnet"])?;
    sleeper(&lab, "hidden", "1", &["--network", "othernet"])?;
    let mut probe = vec!["run", "--detach", "--name", "probe", "--network", "name=appnet,alias=prober", "--"];
    probe.extend_from_slice(SLEEP);
    lab.cli_ok(2, &probe)?;

    let webs = lab.wait_service("web", 3, T)?;
    let dbs = lab.wait_service("db", 2, T)?;
    let hid = lab.wait_service("hidden", 1, T)?;
    let asker = webs.iter().find(|t| t["node"] == "snx-dns-n1").map(pid).context("a web task on node 1")?;
    let web_vip = vip(&lab, "web", "appnet")?;

    // The task's own files; the node's are untouched.
    let resolv = in_task(asker, &["cat", "/etc/resolv.conf"])?;
    assert!(resolv.lines().any(|l| l == "nameserver 127.0.0.11"), "{resolv}");
    assert!(!resolv.contains("search"), "--dns-search . means none: {resolv}");
    let hosts = in_task(asker, &["cat", "/etc/hosts"])?;
    let own = webs.iter().find(|t| pid(t) == asker).context("asker")?;
    assert!(hosts.contains(&format!("{}\t{}", own["addresses"]["appnet"].as_str().unwrap_or("?"), own["name"].as_str().unwrap_or("?"))), "{hosts}");
    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), node_resolv_before, "the node's resolv.conf is not changed");

    // service -> VIP, by dig and by glibc, with the TTL the nodes were given.
    assert_eq!(short(asker, &["web"])?, set(&[&web_vip]));
    let answer = dig(asker, &["+noall", "+answer", "web"])?;
    assert_eq!(answer.split_whitespace().nth(1), Some("7"), "--dns-ttl 7: {answer}");
    let getent = in_task(asker, &["getent", "hosts", "web"])?;
    assert!(getent.starts_with(&format!("{web_vip} ")), "getent hosts web: {getent}");
    // tasks.web -> exactly the running tasks.
    wait_tasks(asker, "web", &addrs(&webs, "appnet"))?;
    // dnsrr: the task addresses, no VIP.
    assert_eq!(short(asker, &["db"])?, addrs(&dbs, "appnet"));
    // aliases: a service's resolves like the service, a standalone task's to the task.
    assert_eq!(short(asker, &["api"])?, set(&[&web_vip]));
    let probe_ip = wait_for("probe's endpoint", T, || {
        let n: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "appnet"]).ok()?).ok()?;
        n["endpoints"].as_array()?.iter().find(|e| e["name"] == "probe")?["ip"].as_str().map(str::to_string)
    })?;
    assert_eq!(short(asker, &["probe"])?, set(&[&probe_ip]));
    assert_eq!(short(asker, &["prober"])?, set(&[&probe_ip]));
    // PTR of a task and of the VIP; SRV from the published port; AAAA is empty NOERROR.
    let other = webs.iter().find(|t| pid(t) != asker).context("another web task")?;
    let other_ip = other["addresses"]["appnet"].as_str().context("address")?;
    assert_eq!(short(asker, &["-x", other_ip])?, set(&[&format!("{}.", other["name"].as_str().unwrap_or("?"))]));
    assert_eq!(short(asker, &["-x", &web_vip])?, set(&["web."]));
    assert_eq!(short(asker, &["SRV", "_http._tcp.web"])?, set(&["0 1 80 web."]));
    let aaaa = dig(asker, &["AAAA", "web"])?;
    assert_eq!(status(&aaaa), "NOERROR", "{aaaa}");
    assert!(aaaa.contains("ANSWER: 0,"), "{aaaa}");
    // A cluster-only name that does not exist is answered here.
    assert_eq!(status(&dig(asker, &["tasks.nothing"])?), "NXDOMAIN");

    // `service update` changes the published ports of running tasks: SRV follows, no task is
    // replaced or restarted; a port published with none given comes from 30000-32767.
    let before: BTreeSet<(String, u32)> = webs.iter().map(|t| (t["id"].as_str().unwrap_or("?").to_string(), pid(t))).collect();
    lab.cli_ok(0, &["service", "update", "web", "--publish-add", "published=9000,target=81", "--publish-add", "82", "--publish-rm", "8080"])?;
    let mut last = BTreeSet::new();
    wait_for("SRV _http._tcp.web after the update", T, || {
        last = short(asker, &["SRV", "_http._tcp.web"]).ok()?;
        (last == set(&["0 1 81 web.", "0 1 82 web."])).then_some(())
    })
    .with_context(|| format!("last SRV answer {last:?}"))?;
    let inspect: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", "web"])?)?;
    let ports: BTreeSet<(u64, u64)> = inspect["ports"].as_array().context("ports")?.iter().filter_map(|p| Some((p["published"].as_u64()?, p["target"].as_u64()?))).collect();
    assert_eq!(ports, BTreeSet::from([(9000, 81), (30000, 82)]), "{inspect}");
    let ls = lab.cli_ok(0, &["service", "ls"])?;
    assert!(ls.contains("*:9000->81/tcp") && ls.contains("*:30000->82/tcp") && !ls.contains("8080"), "{ls}");
    let after: BTreeSet<(String, u32)> = lab.wait_service("web", 3, T)?.iter().map(|t| (t["id"].as_str().unwrap_or("?").to_string(), pid(t))).collect();
    assert_eq!(after, before, "the same tasks with the same processes");
    let err = lab.cli_err(0, &["service", "create", "--name", "thief", "--publish", "9000:80", "--", "true"])?;
    assert!(err.contains("port 9000/tcp is already published by service web"), "{err}");

    // Scoping: othernet's names are not visible from appnet, and back.
    assert!(short(asker, &["hidden"])?.is_empty(), "hidden lives on othernet only");
    assert_eq!(status(&dig(asker, &["tasks.hidden"])?), "NXDOMAIN");
    let hidden_pid = pid(&hid[0]);
    assert!(short(hidden_pid, &["web"])?.is_empty(), "web lives on appnet only");
    assert_eq!(short(hidden_pid, &["hidden"])?.len(), 1);

    // Scale 3 -> 5 -> 2: tasks.web follows on every node.
    let asker3 = dbs.iter().chain(webs.iter()).find(|t| t["node"] == "snx-dns-n3").map(pid);
    for n in ["5", "2"] {
        lab.cli_ok(0, &["service", "scale", &format!("web={n}")])?;
        let now = lab.wait_service("web", n.parse()?, T)?;
        let asker_alive = now.iter().any(|t| pid(t) == asker);
        let from = if asker_alive { asker } else { pid(&dbs[0]) };
        wait_tasks(from, "web", &addrs(&now, "appnet"))?;
        if let Some(p) = asker3.filter(|p| now.iter().chain(dbs.iter()).any(|t| pid(t) == *p)) {
            wait_tasks(p, "web", &addrs(&now, "appnet"))?;
        }
    }
    Ok(())
}

#[test]
fn forty_tasks_set_tc_over_udp_tcp_gives_all_and_garbage_breaks_nothing() -> Result<()> {
    let lab = dns_lab("snx-dnstc", 2, &[])?;
    sleeper(&lab, "big", "40", &["--network", "appnet"])?;
    let tasks = lab.wait_service("big", 40, Duration::from_secs(90))?;
    let asker = pid(&tasks[0]);
    let all = addrs(&tasks, "appnet");
    assert_eq!(all.len(), 40);
    // Wait until every task is in the table here (over TCP: the whole answer).
    wait_for("40 addresses over TCP", T, || (short(asker, &["+tcp", "tasks.big"]).ok()? == all).then_some(()))?;
    let udp = dig(asker, &["+ignore", "+noedns", "tasks.big"])?;
    let flags = udp.lines().find(|l| l.contains(";; flags:")).unwrap_or_default().to_string();
    assert!(flags.contains(" tc"), "a 40-address answer over UDP without EDNS sets TC: {flags}");
    let udp_len: usize = udp.split("MSG SIZE  rcvd: ").nth(1).and_then(|s| s.trim().parse().ok()).context("message size")?;
    assert!(udp_len <= 512, "{udp_len} bytes");
    // dig's default: retry over TCP on TC, and get everything.
    assert_eq!(short(asker, &["+noedns", "tasks.big"])?, all);
    // A big EDNS buffer fits all 40 over UDP.
    let edns = dig(asker, &["+bufsize=4096", "+ignore", "tasks.big"])?;
    assert!(!edns.lines().any(|l| l.contains(";; flags:") && l.contains(" tc")), "{edns}");
    assert!(edns.contains("ANSWER: 40,"), "{edns}");

    // Garbage: short, long, a bad name, a response instead of a query; then a valid query.
    let garbage = r#"
import socket, os
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for g in [b"\x00", os.urandom(11), os.urandom(700), b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc", b"\x12\x34\x81\x80" + bytes(8)] * 50:
    s.sendto(g, ("127.0.0.11", 53))
t = socket.create_connection(("127.0.0.11", 53), timeout=2)
t.sendall(b"\x00\x05hello")
t.close()
print("sent")
"#;
    assert_eq!(in_task(asker, &["python3", "-c", garbage])?.trim(), "sent");
    assert_eq!(short(asker, &["+tcp", "tasks.big"])?, all, "answers after garbage");
    let ch = dig(asker, &["-c", "CH", "TXT", "version.bind"])?;
    assert_eq!(status(&ch), "NOTIMP", "{ch}");
    Ok(())
}

/// A dnsmasq started by the test on node 3 of the lab: the upstream of the other nodes.
fn upstream(lab: &str, ns: &str, addr: &str) -> Result<Child> {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces"])
        .arg(format!("--listen-address={addr}"))
        .args(["--port=53", "--host-record=ext.example,192.0.2.77", "--local=/example/", "--pid-file=", "--user=root"])
        .env("SWARMNET_LAB", lab)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start dnsmasq (apt install dnsmasq-base; .ci/setup does it)")?;
    Ok(child)
}

#[test]
fn other_names_are_forwarded_upstream_and_a_dead_upstream_gives_servfail() -> Result<()> {
    need_dig()?;
    // Node 3 runs no daemon: it is the upstream resolver's host. The nodes' resolv.conf
    // (a file of the test's, given with the hidden --resolv-conf) names it, with a search
    // domain and an option that the tasks' files must carry.
    let node_resolv = std::env::temp_dir().join("snx-dnsfwd-resolv.conf");
    std::fs::write(&node_resolv, "nameserver 10.210.0.3\nsearch corp.example\noptions ndots:2\n")?;
    let node_resolv_arg = node_resolv.display().to_string();
    let lab = Lab::up_full("snx-dnsfwd", 3, 2, 1.0, &[], &["--resolv-conf", &node_resolv_arg, "--dns-timeout-ms", "1000"])?;
    let _ = std::fs::remove_file(&node_resolv);
    let mut dnsmasq = upstream("snx-dnsfwd", "snx-dnsfwd-n3", "10.210.0.3")?;
    let result = (|| -> Result<()> {
        lab.cli_ok(0, &["network", "create", "--driver", "overlay", "appnet"])?;
        sleeper(&lab, "web", "2", &["--network", "appnet"])?;
        let tasks = lab.wait_service("web", 2, T)?;
        let asker = pid(&tasks[0]);
        let resolv = in_task(asker, &["cat", "/etc/resolv.conf"])?;
        assert!(resolv.contains("nameserver 127.0.0.11\nsearch corp.example\noptions ndots:2\n"), "the node's search and options: {resolv}");
        // glibc walks the search list first (ndots:2): web.corp.example goes upstream and is
        // NXDOMAIN there, then `web` is ours.
        let getent = in_task(asker, &["getent", "hosts", "web"])?;
        assert!(!getent.is_empty(), "getent hosts web through the search list");
        wait_for("the upstream answers ext.example", T, || (short(asker, &["ext.example"]).ok()? == set(&["192.0.2.77"])).then_some(()))?;
        assert_eq!(short(asker, &["+tcp", "ext.example"])?, set(&["192.0.2.77"]), "forwarded over TCP too");
        let getent = in_task(asker, &["getent", "hosts", "ext.example"])?;
        assert!(getent.starts_with("192.0.2.77"), "{getent}");
        // The upstream's rcode comes back unchanged.
        assert_eq!(status(&dig(asker, &["nope.example"])?), "NXDOMAIN");
        // Cluster names still answered locally.
        assert_eq!(short(asker, &["tasks.web"])?, addrs(&tasks, "appnet"));
        let node = tasks[0]["node"].as_str().context("node")?;
        let i = lab.nodes.iter().position(|n| n.ns == node).context("node index")?;
        let inspect: Value = serde_json::from_str(&lab.cli_ok(i, &["network", "inspect", "appnet"])?)?;
        let counters = &inspect["local_dns"];
        assert!(counters["forwarded"].as_u64().unwrap_or(0) >= 3 && counters["answered_locally"].as_u64().unwrap_or(0) >= 1, "{counters}");
        Ok(())
    })();
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    result?;
    let asker = pid(&lab.running_tasks("web")?[0]);
    // Upstream gone (port closed): SERVFAIL, at once.
    let down = dig(asker, &["ext.example"])?;
    assert_eq!(status(&down), "SERVFAIL", "{down}");
    // Upstream silent (a socket that never answers): SERVFAIL within our 1 s timeout, well
    // before dig's own 3 s.
    let mut silent = Command::new("ip")
        .args(["netns", "exec", "snx-dnsfwd-n3", "python3", "-c", "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('10.210.0.3',53))\ntime.sleep(600)"])
        .env("SWARMNET_LAB", "snx-dnsfwd")
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let quiet = dig(asker, &["ext.example"]);
    let _ = silent.kill();
    let _ = silent.wait();
    let quiet = quiet?;
    assert_eq!(status(&quiet), "SERVFAIL", "{quiet}");
    Ok(())
}

#[test]
fn a_killed_agents_tasks_leave_tasks_answers_on_the_other_nodes() -> Result<()> {
    let mut lab = dns_lab("snx-dnskill", 3, &[])?;
    sleeper(&lab, "web", "3", &["--network", "appnet"])?;
    let tasks = lab.wait_service("web", 3, T)?;
    let asker = tasks.iter().find(|t| t["node"] == "snx-dnskill-n1").map(pid).context("a task on node 1")?;
    let victim = tasks.iter().find(|t| t["node"] == "snx-dnskill-n3").context("a task on node 3")?;
    let victim_ip = victim["addresses"]["appnet"].as_str().context("address")?.to_string();
    wait_tasks(asker, "web", &addrs(&tasks, "appnet"))?;
    lab.stop_node(2, 9)?;
    // Gossip declares node 3 down but its host still answers, so its entries stay until the
    // manager declares the node down (3 heartbeats): then its task leaves the answers (its
    // process may still run, but the manager replaces it elsewhere).
    wait_for("the killed node's task to leave tasks.web", T, || {
        let now = short(asker, &["tasks.web"]).ok()?;
        (!now.contains(&victim_ip) && !now.is_empty()).then_some(())
    })?;
    // The manager reschedules; the answers follow.
    let again = wait_for("3 running tasks on live nodes", Duration::from_secs(60), || {
        let t = lab.running_tasks("web").ok()?;
        (t.len() == 3 && t.iter().all(|t| t["node"] != "snx-dnskill-n3")).then_some(t)
    })?;
    wait_tasks(asker, "web", &addrs(&again, "appnet"))?;
    Ok(())
}

#[test]
fn a_task_adopted_after_an_agent_restart_gets_its_resolver_back() -> Result<()> {
    let mut lab = dns_lab("snx-dnsadopt", 2, &[])?;
    sleeper(&lab, "web", "2", &["--network", "appnet"])?;
    let tasks = lab.wait_service("web", 2, T)?;
    let on2 = tasks.iter().find(|t| t["node"] == "snx-dnsadopt-n2").map(pid).context("a task on node 2")?;
    let vip = vip(&lab, "web", "appnet")?;
    assert_eq!(short(on2, &["web"])?, set(&[&vip]));
    // SIGTERM: the daemon goes, its task stays (and has no resolver meanwhile).
    lab.stop_node(1, 15)?;
    assert!(swarmnet_lab::pid_alive(on2), "the task outlives its daemon");
    lab.start_node(1)?;
    wait_for("the adopted task's resolver", T, || (short(on2, &["web"]).ok()? == set(&[&vip])).then_some(()))?;
    let again = lab.wait_service("web", 2, T)?;
    assert!(again.iter().any(|t| pid(t) == on2), "the same process was adopted");
    wait_tasks(on2, "web", &addrs(&again, "appnet"))?;
    Ok(())
}

#[test]
fn a_task_whose_process_exits_leaves_the_answers_until_it_runs_again() -> Result<()> {
    let lab = dns_lab("snx-dnsdrain", 2, &[])?;
    sleeper(&lab, "web", "2", &["--network", "appnet"])?;
    // Listens, is stopped by `timeout` after 2 s, is restarted after a backoff growing to
    // 5 s: its endpoint turns draining at each exit and active each time it listens again.
    lab.cli_ok(0, &["service", "create", "--detach", "--name", "flaky", "--replicas", "1", "--network", "appnet", "--", "timeout", "2", "python3", "-m", "http.server", "80"])?;
    let webs = lab.wait_service("web", 2, T)?;
    let flaky_ip = wait_for("flaky's address", T, || {
        let v = lab.cli_json(0, &["service", "ps", "flaky"]).ok()?;
        v.as_array()?.first()?["addresses"]["appnet"].as_str().map(str::to_string)
    })?;
    for w in &webs {
        let asker = pid(w);
        wait_for(&format!("tasks.flaky empty from {}", w["node"]), T, || {
            let a = dig(asker, &["tasks.flaky"]).ok()?;
            (status(&a) == "NOERROR" && a.contains("ANSWER: 0,")).then_some(())
        })?;
        wait_for(&format!("tasks.flaky back from {}", w["node"]), T, || (short(asker, &["tasks.flaky"]).ok()? == set(&[&flaky_ip])).then_some(()))?;
    }
    Ok(())
}
