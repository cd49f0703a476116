//! The service-VIP load balancer on the lab (issue 9): one conformance suite, run against
//! both backends (`--lb ebpf` and `--lb nftables`), checked with real sockets from inside
//! tasks (`swarmnet run`: their sockets are the ones the load balancer translates): round
//! robin over TCP and UDP, the VIP as the peer, refusal without tasks, scoping to the
//! service's networks, drain, a connected UDP socket whose task left, and an agent killed
//! and restarted under a looping client. Needs root, python3 and nft.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use swarmnet_lab::{in_ns, tempdir, wait_for, Lab};

const T: Duration = Duration::from_secs(30);
const PORT: &str = "7000";

fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name).display().to_string()
}

fn vip(lab: &Lab, svc: &str, net: &str) -> Result<String> {
    let v: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", svc])?)?;
    v["vips"][net].as_str().map(str::to_string).with_context(|| format!("service {svc} has no VIP on {net}: {v}"))
}

/// A lab whose daemons use load-balancer backend `lb`, with an attachable `appnet` and
/// `web`: `replicas` tasks of the test server.
fn lab_with_web(name: &str, lb: &str, nodes: usize, replicas: usize) -> Result<(Lab, String)> {
    let lab = Lab::up_full(&format!("{name}-{}", &lb[..1]), nodes, nodes, 1.0, &[], &["--lb", lb])?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    let server = script("lb_server.py");
    let r = replicas.to_string();
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", &r, "--network", "appnet", "--", "python3", &server, PORT])?;
    lab.wait_service("web", replicas, T)?;
    let v = vip(&lab, "web", "appnet")?;
    Ok((lab, v))
}

/// Runs the test client as a task on node `i` (on `net`) and parses what it prints.
fn client(lab: &Lab, i: usize, name: &str, net: &str, args: &[&str]) -> Result<Value> {
    let c = script("lb_client.py");
    let mut a = vec!["run", "--name", name, "--network", net, "--", "python3", &c];
    a.extend_from_slice(args);
    let out = lab.cli_ok(i, &a)?;
    serde_json::from_str(out.trim()).with_context(|| format!("client output: {out}"))
}

fn counts(v: &Value) -> BTreeMap<String, u64> {
    v["counts"].as_object().map(|m| m.iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))).collect()).unwrap_or_default()
}

/// Each of `names` got `total / names.len()` within ±10 %, and nobody else got any.
fn assert_even(what: &str, got: &BTreeMap<String, u64>, names: &[&str], total: u64) {
    let share = total / names.len() as u64;
    let keys: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(keys, names, "{what}: exactly these tasks answered: {got:?}");
    for (k, n) in got {
        assert!(n.abs_diff(share) <= share / 10, "{what}: {k} got {n} of {total}, not {share} ± 10 %: {got:?}");
    }
}

fn wait_until_ready(lab: &Lab, node: usize, vip: &str, backends: usize) -> Result<()> {
    wait_for(&format!("node {} programs {backends} active backends for {vip}", node + 1), T, || {
        let t = lab.cli_json(node, &["lb", "ls"]).ok()?;
        let s = t["services"].as_array()?.iter().find(|s| s["vip"] == vip)?.clone();
        let active = s["backends"].as_array()?.iter().filter(|b| b["state"] == "active").count();
        (active == backends).then_some(())
    })
}

/// One test per scenario and backend.
macro_rules! both {
    ($($scenario:ident),* $(,)?) => {
        mod ebpf {
            $(#[test]
            fn $scenario() -> anyhow::Result<()> {
                super::$scenario("ebpf")
            })*
        }
        mod nftables {
            $(#[test]
            fn $scenario() -> anyhow::Result<()> {
                super::$scenario("nftables")
            })*
        }
    };
}

both!(round_robin_and_the_vip_as_peer, refusal_and_scoping, drain, connected_udp_to_a_task_that_left, agent_kill_and_restart);

/// A VIP spreads new connections and flows round robin and is the peer the client sees.
fn round_robin_and_the_vip_as_peer(lb: &str) -> Result<()> {
    let (lab, vip) = lab_with_web("snx-lb", lb, 3, 3)?;
    wait_until_ready(&lab, 1, &vip, 3)?;
    let names = ["web.1", "web.2", "web.3"];

    let r = client(&lab, 1, "tcp600", "appnet", &["tcp", &vip, PORT, "600"])?;
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(r["bad_peer"], serde_json::json!([]), "getpeername() shows the VIP: {r}");
    assert_even("600 TCP connections", &counts(&r), &names, 600);

    let r = client(&lab, 1, "udp300", "appnet", &["udp", &vip, PORT, "300"])?;
    assert_eq!(r["errors"], serde_json::json!([]), "every flow stays on its task: {r}");
    assert_eq!(r["bad_source"], serde_json::json!([]), "every reply comes from the VIP: {r}");
    assert_even("300 UDP flows", &counts(&r), &names, 300);

    // Any port: the VIP forwards the port asked for to the same port of a task.
    let r = client(&lab, 1, "port7001", "appnet", &["reach", &vip, "7001"])?;
    assert!(r["reached"].as_str().is_some_and(|s| s.starts_with("web.")), "VIP:7001: {r}");

    let r = client(&lab, 1, "udpconn", "appnet", &["udp-connected", &vip, PORT])?;
    assert!(r["reply"].as_str().is_some_and(|s| s.starts_with("web.")), "{r}");
    assert_eq!(r["peer"], serde_json::json!([vip, 7000]), "{r}");

    // `lb ls` reads the kernel: the VIP, its three active backends, what each was handed.
    let t = lab.cli_json(1, &["lb", "ls"])?;
    assert_eq!(t["backend"], lb, "{t}");
    let s = t["services"].as_array().and_then(|a| a.iter().find(|s| s["vip"] == vip.as_str())).context("the VIP in lb ls")?;
    assert_eq!(s["service"], "web", "{t}");
    let handed: u64 = s["backends"].as_array().context("backends")?.iter().filter_map(|b| b["connections"].as_u64()).sum();
    if lb == "ebpf" {
        assert_eq!(handed, 902, "600 connections, 300 UDP flows (two datagrams each), one connection to another port and one connected UDP socket were handed out: {t}");
    } else {
        // nftables counts in each client's namespace, read when the client task goes.
        assert!((890..=902).contains(&handed), "about 902 connections and flows: {t}");
    }
    let table = lab.cli_ok(1, &["lb", "ls"])?;
    assert!(table.contains(&format!("backend: {lb}")) && table.contains(&vip) && table.contains("web.2"), "{table}");
    Ok(())
}

/// A VIP without tasks refuses at once, and only its networks translate it.
fn refusal_and_scoping(lb: &str) -> Result<()> {
    let (lab, web_vip) = lab_with_web("snx-lbref", lb, 2, 2)?;
    // A service created with no replica, and one scaled to 0: both refuse at once.
    lab.cli_ok(0, &["service", "create", "--name", "empty", "--replicas", "0", "--network", "appnet", "--", "sleep", "3600"])?;
    let empty = vip(&lab, "empty", "appnet")?;
    let r = wait_for("a service with no replica refuses", T, || {
        let r = client(&lab, 1, "refused", "appnet", &["refused", &empty, PORT]).ok()?;
        (r["tcp"] == "ECONNREFUSED").then_some(r)
    })?;
    assert_udp_refused(lb, &r);
    assert!(r["tcp_ms"].as_f64().unwrap_or(1e9) < 1000.0, "refused at once, not after a SYN timeout: {r}");
    lab.cli_ok(0, &["service", "scale", "web=0"])?;
    let r = wait_for("a service scaled to 0 refuses", T, || {
        let r = client(&lab, 1, "refused0", "appnet", &["refused", &web_vip, PORT]).ok()?;
        (r["tcp"] == "ECONNREFUSED").then_some(r)
    })?;
    assert_udp_refused(lb, &r);
    // Every task down (a process that keeps exiting): refused at once as well.
    lab.cli_ok(0, &["service", "create", "--detach", "--name", "crashing", "--network", "appnet", "--", "sh", "-c", "exit 1"])?;
    let crashing = vip(&lab, "crashing", "appnet")?;
    let r = wait_for("a service whose task keeps exiting refuses", T, || {
        let r = client(&lab, 1, "refused1", "appnet", &["refused", &crashing, PORT]).ok()?;
        (r["tcp"] == "ECONNREFUSED").then_some(r)
    })?;
    assert!(r["tcp_ms"].as_f64().unwrap_or(1e9) < 1000.0, "refused at once: {r}");
    lab.cli_ok(0, &["service", "scale", "web=2"])?;
    lab.wait_service("web", 2, T)?;
    wait_until_ready(&lab, 1, &web_vip, 2)?;
    // (The new tasks' servers take a moment to listen: until then they refuse themselves.)
    wait_for("the VIP answering again with tasks", T, || {
        let r = client(&lab, 1, "reach", "appnet", &["reach", &web_vip, PORT]).ok()?;
        r["reached"].as_str().is_some_and(|s| s.starts_with("web.")).then_some(())
    })?;

    // A task on another network gets no translation: the VIP means nothing there.
    lab.cli_ok(0, &["network", "create", "--attachable", "othernet"])?;
    let r = client(&lab, 1, "stranger", "othernet", &["reach", &web_vip, PORT])?;
    assert!(r.get("reached").is_none(), "a task of another network must not reach the VIP: {r}");
    // Nor does the node itself (its own namespace is not a task's).
    let c = script("lb_client.py");
    let out = in_ns(&lab.nodes[1].ns, &["python3", &c, "reach", &web_vip, PORT])?;
    let r: Value = serde_json::from_str(out.trim())?;
    assert!(r.get("reached").is_none(), "the node's own namespace must not reach the VIP: {r}");
    Ok(())
}

/// A stopping task drains: no new connection, and its established ones go on.
fn drain(lb: &str) -> Result<()> {
    let (lab, vip) = lab_with_web("snx-lbdrain", lb, 3, 3)?;
    wait_until_ready(&lab, 1, &vip, 3)?;
    let dir = tempdir("snx-lbdrain")?;
    let d = dir.display().to_string();
    let c = script("lb_client.py");
    lab.cli_ok(1, &["run", "--detach", "--name", "holder", "--network", "appnet", "--", "python3", &c, "hold", &vip, PORT, "web.3", &d])?;
    wait_for("a connection held to web.3", T, || dir.join("held").exists().then_some(()))?;
    // Scaling down stops web.3: its endpoint turns draining before it is signalled (the
    // server serves established connections for 8 s after SIGTERM), and is withdrawn when
    // its process is gone.
    lab.cli_ok(0, &["service", "scale", "--detach", "web=2"])?;
    wait_for("web.3 draining in node 2's load balancer", T, || {
        let t = lab.cli_json(1, &["lb", "ls"]).ok()?;
        let s = t["services"].as_array()?.iter().find(|s| s["vip"] == vip.as_str())?.clone();
        let b = s["backends"].as_array()?;
        let active = b.iter().filter(|b| b["state"] == "active").count();
        let draining = b.iter().any(|b| b["task"] == "web.3" && b["state"] == "draining");
        (active == 2 && draining).then_some(())
    })?;
    std::fs::write(dir.join("go"), b"")?;
    let result = wait_for("the holder's result", T, || std::fs::read_to_string(dir.join("result")).ok())?;
    let r: Value = serde_json::from_str(&result)?;
    assert_eq!(r["held_reply"], "web.3 still", "the established connection still works: {r}");
    let new = counts(&r["new"]);
    assert!(!new.contains_key("web.3"), "no new connection reaches the draining task: {r}");
    assert_eq!(new.values().sum::<u64>(), 60, "every new connection was answered: {r}");
    Ok(())
}

/// A connected UDP socket whose task left gets an error, or is steered to a task that is
/// there: never silence.
fn connected_udp_to_a_task_that_left(lb: &str) -> Result<()> {
    let (lab, vip) = lab_with_web("snx-lbudp", lb, 3, 3)?;
    wait_until_ready(&lab, 1, &vip, 3)?;
    let dir = tempdir("snx-lbudp")?;
    let d = dir.display().to_string();
    let c = script("lb_client.py");
    lab.cli_ok(1, &["run", "--detach", "--name", "udpholder", "--network", "appnet", "--", "python3", &c, "udp-hold", &vip, PORT, "web.3", &d])?;
    wait_for("a connected UDP socket to web.3", T, || dir.join("held").exists().then_some(()))
        .with_context(|| format!("the UDP holder: {}", std::fs::read_to_string(dir.join("result")).unwrap_or_default()))?;
    lab.cli_ok(0, &["service", "scale", "web=2"])?;
    wait_for("web.3 gone from node 2's load balancer", T, || {
        let t = lab.cli_json(1, &["lb", "ls"]).ok()?;
        let s = t["services"].as_array()?.iter().find(|s| s["vip"] == vip.as_str())?.clone();
        let b = s["backends"].as_array()?;
        (b.len() == 2 && !b.iter().any(|b| b["task"] == "web.3")).then_some(())
    })?;
    std::fs::write(dir.join("go"), b"")?;
    let result = wait_for("the UDP holder's result", T, || std::fs::read_to_string(dir.join("result")).ok())?;
    let r: Value = serde_json::from_str(&result)?;
    if lb == "ebpf" {
        // The socket was aborted: a recv() reports ECONNABORTED; a send() on the now
        // unconnected socket fails with EDESTADDRREQ. The application is told.
        let e = r["error"].as_str().unwrap_or_default();
        assert!(e == "ECONNABORTED" || e == "EDESTADDRREQ", "{r}");
    } else {
        // Its conntrack flow was cleared: the next datagram is steered again.
        let reply = r["reply"].as_str().unwrap_or_default();
        assert!(reply.starts_with("web.1 ") || reply.starts_with("web.2 "), "re-steered to a task that is there: {r}");
    }
    Ok(())
}

/// Killing and restarting the agent breaks no connection and attaches nothing twice.
fn agent_kill_and_restart(lb: &str) -> Result<()> {
    let (mut lab, vip) = lab_with_web("snx-lbkill", lb, 3, 3)?;
    wait_until_ready(&lab, 1, &vip, 3)?;
    let dir = tempdir("snx-lbkill")?;
    let counter = dir.join("count").display().to_string();
    let c = script("lb_client.py");
    lab.cli_ok(1, &["run", "--detach", "--name", "looper", "--network", "appnet", "--", "python3", &c, "loop", &vip, PORT, &counter])?;
    let read = |p: &str| -> Option<(u64, u64)> {
        let s = std::fs::read_to_string(p).ok()?;
        let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
        Some((it.next()??, it.next()??))
    };
    wait_for("the looping client running", T, || read(&counter).filter(|(ok, _)| *ok > 50))?;
    lab.stop_node(1, libc::SIGKILL)?;
    lab.start_node(1)?;
    if lb == "ebpf" {
        let log = wait_for("the restarted agent adopting the programs", T, || {
            let l = lab.log(1);
            l.contains("programs_adopted=4").then_some(l)
        })?;
        assert_eq!(log.matches("programs_adopted=0").count(), 1, "the programs were attached once, by the first agent only");
        // And the kernel says so: the programs on the root of cgroup2 (ADR 0024) are the
        // lab's pinned links, four per node, not one more.
        let (listed, pinned, root) = swarmnet_lab::lb_programs_on_root()?;
        assert!(pinned >= 12, "three nodes' four links each are pinned on {}: {pinned}", root.display());
        assert_eq!(listed, pinned, "the programs on {} are the pinned links", root.display());
    }
    let (ok_at_restart, _) = read(&counter).context("counter")?;
    wait_for("more connections after the restart", T, || read(&counter).filter(|(ok, _)| *ok > ok_at_restart + 100))?;
    std::fs::write(format!("{counter}.stop"), b"")?;
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed) = read(&counter).context("counter")?;
    assert_eq!(failed, 0, "{ok} connections succeeded, {failed} failed through the agent's kill and restart");
    // The restarted agent's view of the kernel: the same three backends.
    wait_until_ready(&lab, 1, &vip, 3)?;
    // What changes while the agent is down is caught up when it is back: a service scaled
    // down, a service removed. (A task of node 2 keeps it on the network whichever tasks go.)
    lab.cli_ok(1, &["run", "--detach", "--name", "keeper", "--network", "appnet", "--", "sleep", "3600"])?;
    lab.cli_ok(0, &["service", "create", "--name", "extra", "--network", "appnet", "--", "python3", &script("lb_server.py"), PORT])?;
    lab.wait_service("extra", 1, T)?;
    let extra = self::vip(&lab, "extra", "appnet")?;
    wait_until_ready(&lab, 1, &extra, 1)?;
    lab.stop_node(1, libc::SIGKILL)?;
    lab.cli_ok(0, &["service", "scale", "--detach", "web=2"])?;
    lab.cli_ok(0, &["service", "rm", "extra"])?;
    std::thread::sleep(Duration::from_secs(2));
    lab.start_node(1)?;
    let last = std::cell::RefCell::new(Value::Null);
    let caught_up = wait_for("node 2's load balancer without web.3 and without extra after its restart", T, || {
        let t = lab.cli_json(1, &["lb", "ls"]).ok()?;
        *last.borrow_mut() = t.clone();
        let services = t["services"].as_array()?;
        let s = services.iter().find(|s| s["vip"] == vip.as_str())?.clone();
        let b = s["backends"].as_array()?;
        let active: Vec<&str> = b.iter().filter(|b| b["state"] == "active").filter_map(|b| b["task"].as_str()).collect();
        let extra_gone = !services.iter().any(|s| s["vip"] == extra.as_str());
        (active.len() == 2 && !b.iter().any(|b| b["task"] == "web.3") && extra_gone).then_some(())
    });
    caught_up.with_context(|| format!("node 2's lb ls: {}", last.borrow()))?;
    Ok(())
}

/// The eBPF backend itself, on a cgroup and bpffs folder of its own: a VIP with thousands of
/// backends, and a change that cannot fit (the backend map is full) which is refused whole,
/// leaving the set before it live.
#[test]
fn the_ebpf_maps_take_thousands_of_backends_and_a_full_map_changes_nothing() -> Result<()> {
    use swarmnet_dataplane::lb::{host, BackendLb, BackendState, EbpfLb, Host, LbBackend, ServiceLb};
    swarmnet_lab::require_root()?;
    let node = "snx-lblimits";
    host::remove_leftovers(node)?;
    let h = Host::prepare(node, Some(&swarmnet_lab::lab_bpffs()?))?;
    let dir = tempdir(node)?;
    let svc = |n: u32| ServiceLb {
        vip: std::net::Ipv4Addr::new(10, 99, 0, 1),
        network: "n".into(),
        vni: 4096,
        service: "big".into(),
        backends: (0..n).map(|i| BackendLb { task: format!("t{i}"), ip: std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 100, 0, 0)) + i), state: BackendState::Active }).collect(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let ns = swarmnet_dataplane::netns::NsWorker::start()?;
    let result = rt.block_on(async {
        let lb = EbpfLb::open(&h, ns, &dir.join("lb.lock"))?;
        let one = |r: Vec<Result<(), swarmnet_types::SinkError>>| r.into_iter().next().context("one result")?.map_err(|e| anyhow::anyhow!("{e}"));
        one(lb.set(&[svc(5000)]).await)?;
        let rows = lb.read().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].backends.iter().filter(|b| b.state == BackendState::Active).count(), 5000, "5,000 backends read back");
        one(lb.set(&[svc(3)]).await)?;
        assert_eq!(lb.read().await.map_err(|e| anyhow::anyhow!("{e}"))?[0].backends.len(), 3, "the old generation's backends are gone");
        // More backends than the map can hold: refused with a reason, nothing changed.
        let e = one(lb.set(&[svc(300_000)]).await).expect_err("the backend map cannot hold 300,000");
        assert!(e.to_string().contains("backends: all 262144 ids are in use"), "{e}");
        let rows = lb.read().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(rows[0].backends.len(), 3, "the set before the failed change is still live");
        // And the ids it took are given back: a normal change still fits.
        one(lb.set(&[svc(10)]).await)?;
        assert_eq!(lb.read().await.map_err(|e| anyhow::anyhow!("{e}"))?[0].backends.len(), 10);
        Ok::<(), anyhow::Error>(())
    });
    drop(rt);
    host::remove_leftovers(node)?;
    result
}

/// `--lb auto` on a node where the eBPF programs cannot be pinned (its bpffs is an ordinary
/// folder) falls back to nftables, and says so in `lb ls`; the VIP answers.
#[test]
fn auto_falls_back_to_nftables_with_a_warning() -> Result<()> {
    let not_bpffs = std::env::temp_dir().join(format!("snx-lbauto-not-bpffs-{}", std::process::id()));
    std::fs::create_dir_all(&not_bpffs)?;
    let nb = not_bpffs.display().to_string();
    let lab = Lab::up_full("snx-lbauto", 2, 2, 1.0, &[], &["--lb", "auto", "--bpffs", &nb])?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "2", "--network", "appnet", "--", "python3", &script("lb_server.py"), PORT])?;
    lab.wait_service("web", 2, T)?;
    let vip = vip(&lab, "web", "appnet")?;
    let t = lab.cli_json(1, &["lb", "ls"])?;
    assert_eq!(t["backend"], "nftables", "{t}");
    assert!(t["warning"].as_str().is_some_and(|w| w.contains("eBPF load balancer cannot start")), "{t}");
    assert!(lab.log(1).contains("using nftables"), "the log says it too");
    wait_for("the VIP answering through nftables", T, || {
        let r = client(&lab, 1, "reach", "appnet", &["reach", &vip, PORT]).ok()?;
        r["reached"].as_str().is_some_and(|s| s.starts_with("web.")).then_some(())
    })?;
    drop(lab);
    let _ = std::fs::remove_dir_all(&not_bpffs);
    Ok(())
}

/// UDP to a VIP without tasks is refused at once, an error the application sees:
/// ECONNREFUSED at `sendto()`/`connect()` (eBPF); EPERM at `sendto()`/`send()` (nftables:
/// the output hook rejects the datagram).
fn assert_udp_refused(lb: &str, r: &Value) {
    let want = if lb == "ebpf" { "ECONNREFUSED" } else { "EPERM" };
    assert_eq!(r["udp"], want, "{r}");
    assert_eq!(r["udp_connected"], want, "{r}");
}

/// `lb_client.py loop` as a task on node 1: new connections to `vip` until stopped,
/// counted in a file.
struct Looper {
    counter: String,
}

impl Looper {
    fn start(lab: &Lab, dir: &std::path::Path, name: &str, vip: &str) -> Result<Looper> {
        let counter = dir.join(name).display().to_string();
        lab.cli_ok(0, &["run", "--detach", "--name", name, "--network", "appnet", "--", "python3", &script("lb_client.py"), "loop", vip, PORT, &counter])?;
        let l = Looper { counter };
        wait_for(&format!("the looping client {name} running"), T, || l.read().filter(|(ok, _)| *ok > 50))?;
        Ok(l)
    }

    /// (connections answered, connections failed) so far.
    fn read(&self) -> Option<(u64, u64)> {
        let s = std::fs::read_to_string(&self.counter).ok()?;
        let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
        Some((it.next()??, it.next()??))
    }

    /// Waits for 50 more answered connections, then stops it: the final counts.
    fn stop(&self) -> Result<(u64, u64)> {
        let (ok_at, _) = self.read().context("counter")?;
        wait_for("more connections", T, || self.read().filter(|(ok, _)| *ok > ok_at + 50))?;
        std::fs::write(format!("{}.stop", self.counter), b"")?;
        std::thread::sleep(Duration::from_millis(300));
        self.read().context("counter")
    }

    /// The first failures, as "unix time, why" lines.
    fn errors(&self) -> String {
        std::fs::read_to_string(format!("{}.errors", self.counter)).unwrap_or_default()
    }
}

/// `node update`: a drained node's task moves to another node (drained in the load
/// balancer first, then withdrawn) while a client loops on the VIP; readiness: new tasks
/// of a slow-starting server take no connection before they listen; labels and placement
/// constraints: a service that no node satisfies waits, saying why, and runs once a node
/// gets the label; an unknown constraint is refused and creates nothing.
#[test]
fn node_drain_labels_and_constraints() -> Result<()> {
    let (lab, vip) = lab_with_web("snx-lbnode", "ebpf", 3, 3)?;
    wait_until_ready(&lab, 0, &vip, 3)?;
    let n3 = lab.nodes[2].hostname.clone();
    let dir = tempdir("snx-lbnode")?;
    let looper = Looper::start(&lab, &dir, "looper", &vip)?;
    let on_n3 = |lab: &Lab| -> Result<Vec<String>> {
        let ps = lab.cli_json(0, &["service", "ps", "web"])?;
        Ok(ps.as_array().into_iter().flatten().filter(|t| t["state"] == "running" && t["node"] == n3.as_str()).filter_map(|t| t["name"].as_str().map(str::to_string)).collect())
    };
    let moved = on_n3(&lab)?;
    assert_eq!(moved.len(), 1, "one task on {n3}");
    lab.cli_ok(0, &["node", "update", "--availability", "drain", &n3])?;
    wait_for("web's tasks off the drained node, three running", T, || {
        let running = lab.running_tasks("web").ok()?;
        (running.len() == 3 && on_n3(&lab).ok()?.is_empty()).then_some(())
    })?;
    let ls = lab.cli_json(0, &["node", "ls"])?;
    let n = ls.as_array().and_then(|a| a.iter().find(|n| n["hostname"] == n3.as_str())).cloned().unwrap_or_default();
    assert_eq!(n["availability"], "drain", "{n}");
    wait_until_ready(&lab, 0, &vip, 3)?;
    let (ok, failed) = looper.stop()?;
    // The drained task takes no new connection from the moment it drains (it is signalled
    // only after), and its replacement none before its server listens.
    println!("node drain: {failed} of {} connections through the VIP failed while {} moved", ok + failed, moved[0]);
    assert!(ok > 100, "the VIP kept answering: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "no connection failed while {} moved: {}", moved[0], looper.errors());

    // Readiness: a server that listens a second after it starts. Scaled up under a looping
    // client, its new tasks are `starting` (drained in every load balancer) until they
    // listen, and no connection fails.
    let server = script("lb_server.py");
    let slow_cmd = format!("sleep 1; exec python3 {server} {PORT}");
    lab.cli_ok(0, &["service", "create", "--name", "slow", "--network", "appnet", "--", "sh", "-c", &slow_cmd])?;
    lab.wait_service("slow", 1, T)?;
    let slow_vip = self::vip(&lab, "slow", "appnet")?;
    wait_until_ready(&lab, 0, &slow_vip, 1)?;
    let looper = Looper::start(&lab, &dir, "looper2", &slow_vip)?;
    // The scale waits for them to converge; its progress shows them starting first.
    let out = lab.cli(0, &["service", "scale", "slow=3"])?;
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && progress.contains("overall progress: 3 out of 3 tasks"), "{progress}");
    assert!(progress.lines().any(|l| l.starts_with("slow.") && l.contains(": starting on ")), "new tasks starting first: {progress}");
    assert_eq!(lab.running_tasks("slow")?.len(), 3);
    wait_until_ready(&lab, 0, &slow_vip, 3)?;
    let (ok, failed) = looper.stop()?;
    println!("readiness: {failed} of {} connections through the VIP failed while slow went from 1 to 3", ok + failed);
    assert_eq!(failed, 0, "no connection went to a task before it listened: {}", looper.errors());

    // Constraints: none satisfiable yet, then a node gets the label.
    let n2 = lab.nodes[1].hostname.clone();
    lab.cli_ok(0, &["service", "create", "--detach", "--name", "pinned", "--constraint", "node.labels.zone==x", "--label", "tier=back", "--network", "appnet", "--", "sleep", "infinity"])?;
    let ps = lab.cli_json(0, &["service", "ps", "pinned"])?;
    let why = ps[0]["error"].as_str().unwrap_or_default().to_string();
    assert!(ps[0]["state"] == "pending" && why.contains("no suitable node") && why.contains("node.labels.zone==x"), "{ps}");
    lab.cli_ok(0, &["node", "update", "--label-add", "zone=x", &n2])?;
    lab.wait_service("pinned", 1, T)?;
    let ps = lab.cli_json(0, &["service", "ps", "pinned"])?;
    assert_eq!(ps[0]["node"], n2.as_str(), "on the labelled node: {ps}");
    let inspect: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", "pinned"])?)?;
    assert_eq!((inspect["constraints"][0].as_str(), inspect["labels"]["tier"].as_str()), (Some("node.labels.zone==x"), Some("back")), "{inspect}");
    let node: Value = serde_json::from_str(&lab.cli_ok(0, &["node", "inspect", &n2])?)?;
    assert_eq!(node["labels"]["zone"], "x", "{node}");
    // Bad input: refused, nothing created or changed.
    let (code, err) = lab.cli_fail(0, &["service", "create", "--name", "bad", "--constraint", "node.color==red", "--", "sleep", "1"])?;
    assert!(code == 2 && err.contains("unknown key") && err.contains("node.color"), "{code} {err}");
    let (code, err) = lab.cli_fail(0, &["node", "update", "--availability", "asleep", &n2])?;
    assert!(code == 2 && err.contains("active, pause or drain"), "{code} {err}");
    assert!(!lab.cli_ok(0, &["service", "ls"])?.contains("bad"), "nothing created");
    Ok(())
}

/// `service update`: a rolling update (a new environment, one task at a time, a second
/// apart) under a client looping on the VIP: every task replaced, the new environment in
/// their processes, no connection failed; an update to a command that fails pauses, its new task
/// stopped and the old ones serving on (exit 9, saying why); labels and replicas change
/// without replacing anything.
#[test]
fn a_rolling_update_never_fails_a_connection() -> Result<()> {
    let (lab, vip) = lab_with_web("snx-lbroll", "ebpf", 3, 2)?;
    let dir = tempdir("snx-lbroll")?;
    // (Node 1 may have no task of web: the looper puts it on the network.)
    let looper = Looper::start(&lab, &dir, "looper", &vip)?;
    wait_until_ready(&lab, 0, &vip, 2)?;
    let before: BTreeSet<String> = lab.running_tasks("web")?.iter().filter_map(|t| t["id"].as_str().map(str::to_string)).collect();
    let out = lab.cli(0, &["service", "update", "web", "--env-add", "GREETING=hello", "--update-parallelism", "1", "--update-delay", "1s"])?;
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{progress}");
    assert!(progress.contains("update: updating to version 1") && progress.trim_end().ends_with("verify: Service converged"), "{progress}");
    let after = lab.running_tasks("web")?;
    let ids: BTreeSet<String> = after.iter().filter_map(|t| t["id"].as_str().map(str::to_string)).collect();
    assert!(ids.len() == 2 && ids.is_disjoint(&before), "every task replaced: {before:?} → {ids:?}");
    assert!(after.iter().all(|t| t["version"] == 1), "{after:?}");
    let info: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", "web"])?)?;
    assert_eq!((info["version"].as_u64(), info["update_status"]["state"].as_str(), info["env"]["GREETING"].as_str()), (Some(1), Some("completed"), Some("hello")), "{info}");
    for t in &after {
        let pid = t["pid"].as_u64().context("a running task's pid")?;
        let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
        assert!(environ.split(|b| *b == 0).any(|v| v == b"GREETING=hello"), "{} has the new environment", t["name"]);
    }

    // Labels and replicas: no task replaced.
    lab.cli_ok(0, &["service", "update", "web", "--label-add", "tier=front", "--replicas", "3"])?;
    let now: BTreeSet<String> = lab.running_tasks("web")?.iter().filter_map(|t| t["id"].as_str().map(str::to_string)).collect();
    assert!(now.len() == 3 && ids.is_subset(&now), "the two kept, one added: {ids:?} → {now:?}");
    wait_until_ready(&lab, 0, &vip, 3)?;
    // A new command that fails: paused, the old (version 1) tasks serve on.
    let (code, err) = lab.cli_fail(0, &["service", "update", "web", "--", "sh", "-c", "echo broken; exit 3"])?;
    assert!(code == 9 && err.contains("update paused: the new task web.") && err.contains("exited with status 3"), "{code}: {err}");
    let info: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", "web"])?)?;
    assert_eq!(info["update_status"]["state"], "paused", "{info}");
    wait_for("three tasks of version 1 running, nothing else meant to run", T, || {
        let ps = lab.cli_json(0, &["service", "ps", "web"]).ok()?;
        let meant: Vec<&Value> = ps.as_array()?.iter().filter(|t| t["desired_state"] == "running").collect();
        (meant.len() == 3 && meant.iter().all(|t| t["version"] == 1 && t["state"] == "running")).then_some(())
    })?;
    wait_until_ready(&lab, 0, &vip, 3)?;
    let (ok, failed) = looper.stop()?;
    println!("rolling update: {failed} of {} connections through the VIP failed", ok + failed);
    assert_eq!(failed, 0, "no connection failed through the update, the pause and the scale: {}", looper.errors());
    Ok(())
}
