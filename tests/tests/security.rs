//! Sealed gossip on the lab (issue 11): what crosses 7946 is unreadable, and packets from a
//! host that is not a node (the plaintext format, or sealed with a key the manager never
//! handed out) change no table, no kernel entry and no DNS answer. Needs root and python3.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use swarmnet_gossip::seal::{new_key, Keyring};
use swarmnet_gossip::{Gossip, Item};
use swarmnet_lab::{in_netns_of, in_ns, wait_for, Lab};
use swarmnet_types::{mac_for, Endpoint, EndpointState};

const T: Duration = Duration::from_secs(30);

fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name).display().to_string()
}

/// An endpoint as a forger would publish it: named `name` everywhere, at `ip`, on `vtep`.
fn forged(network: &str, name: &str, ip: std::net::Ipv4Addr, vtep: &str) -> Result<Endpoint> {
    Ok(Endpoint {
        network: network.into(),
        id: name.into(),
        task_name: name.into(),
        service_name: name.into(),
        service_id: name.into(),
        aliases: vec![],
        ip,
        mac: mac_for(ip),
        vtep: vtep.parse()?,
        vip: None,
        ports: vec![],
        state: EndpointState::Active,
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[test]
fn gossip_is_unreadable_and_forged_packets_change_nothing() -> Result<()> {
    let lab = Lab::up("snx-gsec", 2, 2, 1.0)?;
    lab.cli_ok(0, &["network", "create", "appnet"])?;
    let net: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "appnet"])?)?;
    let net_id = net["id"].as_str().context("network id")?.to_string();
    let dir = std::env::temp_dir().join(format!("snx-gsec-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> Result<()> {
        // A capture on node 1's underlay link while a service is made and scaled.
        let cap = dir.join("cap.bin");
        let sniff = script("sniff.py");
        let ul = format!("{}-ul", lab.name);
        let sniffer = std::process::Command::new("ip").args(["netns", "exec", &ul, "python3", &sniff, "snv1", "7946", "8", &cap.display().to_string()]).stdout(std::process::Stdio::piped()).spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        lab.cli_ok(0, &["service", "create", "--name", "zebrafish", "--replicas", "2", "--network", "appnet", "--", "sleep", "3600"])?;
        let tasks = lab.wait_service("zebrafish", 2, T)?;
        lab.cli_ok(0, &["service", "scale", "zebrafish=3"])?;
        let tasks3 = lab.wait_service("zebrafish", 3, T)?;
        let out = sniffer.wait_with_output()?;
        let kept: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().context("sniffer output")?;
        let bytes = std::fs::read(&cap)?;
        assert!(kept > 10 && bytes.len() > 1000, "the capture saw gossip: {kept} packets, {} bytes", bytes.len());
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(!has(b"zebrafish"), "the service name crossed 7946 in clear");
        for t in &tasks3 {
            let ip: std::net::Ipv4Addr = t["addresses"]["appnet"].as_str().context("address")?.parse()?;
            assert!(!has(&ip.octets()), "task address {ip} crossed 7946 in clear");
            assert!(!has(&mac_for(ip)), "task MAC of {ip} crossed 7946 in clear");
            assert!(!has(t["id"].as_str().unwrap_or("-").as_bytes()), "a task id crossed 7946 in clear");
        }

        // Forged endpoints from a host that is not a node: plaintext, and sealed with a key
        // of its own, under the id of the cluster's key.
        let cl = lab.outside_client()?;
        let node2 = lab
            .cli_json(0, &["node", "ls"])?
            .as_array()
            .context("nodes")?
            .iter()
            .find(|n| n["hostname"] == lab.nodes[1].ns.as_str())
            .and_then(|n| n["id"].as_str().map(str::to_string))
            .context("node 2 id")?;
        let forged_ip = std::net::Ipv4Addr::new(10, 0, 0, 200);
        // Named as the service, so it would show in `tasks.zebrafish`.
        let mut ep = forged(&net_id, "forged1", forged_ip, "10.210.0.250")?;
        ep.service_name = "zebrafish".into();
        ep.task_name = "zebrafish.9".into();
        // It claims to be node 2's, with a version far ahead.
        let item = Item { owner: node2, gen: u64::MAX / 2, version: 1 << 40, network: net_id.clone(), id: ep.id.clone(), value: Some(std::sync::Arc::new(ep)) };
        let plain = Gossip::plaintext_items(vec![item]).context("encode")?;
        let sealed_other = Keyring::new(&[(1, new_key().map_err(anyhow::Error::msg)?)]).map_err(anyhow::Error::msg)?.seal(&plain, now_ms()).map_err(anyhow::Error::msg)?;
        let send = script("send_udp.py");
        for (i, pkt) in [plain, sealed_other].iter().enumerate() {
            let f = dir.join(format!("pkt{i}"));
            std::fs::write(&f, pkt)?;
            for n in &lab.nodes {
                in_ns(&cl, &["python3", &send, &n.addr, "7946", &f.display().to_string()])?;
            }
        }
        // A sealed packet captured above, sent again from the outside host: refused too.
        let replay = PathBuf::from(format!("{}.first", cap.display()));
        assert!(replay.exists(), "the capture kept a sealed UDP packet to replay");
        for n in &lab.nodes {
            in_ns(&cl, &["python3", &send, &n.addr, "7946", &replay.display().to_string()])?;
        }
        // Each node counts them, and nothing changed.
        for i in 0..2 {
            wait_for(&format!("node {} counting the forged and replayed packets", i + 1), T, || {
                let v: Value = serde_json::from_str(&lab.cli_ok(i, &["network", "inspect", "appnet"]).ok()?).ok()?;
                (v["local_gossip"]["unauthenticated"].as_u64()? >= 3).then_some(())
            })?;
        }
        std::thread::sleep(Duration::from_secs(2));
        for i in 0..2 {
            let v: Value = serde_json::from_str(&lab.cli_ok(i, &["network", "inspect", "appnet"])?)?;
            let eps = v["local_endpoints"].as_array().context("local endpoints")?;
            assert!(!eps.iter().any(|e| e["task_id"] == "forged1"), "node {}: the forged endpoint is in the table: {v}", i + 1);
            assert_eq!(eps.len(), 3, "node {}: exactly the three tasks: {v}", i + 1);
        }
        // No kernel entry for it, and DNS answers only the real tasks.
        let pid = tasks[0]["pid"].as_u64().context("pid")? as u32;
        let neigh = in_netns_of(pid, &["ip", "neigh", "show", &forged_ip.to_string()])?;
        assert!(!neigh.contains("lladdr"), "{neigh}");
        let holders: Value = serde_json::from_slice(&std::fs::read(lab.nodes[0].data_dir.join("sandboxes").join("state.json"))?)?;
        for h in holders.as_object().context("sandboxes")?.values() {
            let hp = h["pid"].as_u64().context("holder")? as u32;
            let n = in_netns_of(hp, &["ip", "neigh", "show"])?;
            assert!(!n.contains(&forged_ip.to_string()), "a sandbox of node 1 has a neighbour entry for the forged address: {n}");
        }
        let answer = swarmnet_lab::in_task(pid, &["dig", "+short", "tasks.zebrafish"])?;
        assert!(!answer.contains(&forged_ip.to_string()), "DNS serves the forged address: {answer}");
        assert_eq!(answer.lines().count(), 3, "{answer}");
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Two key rotations while a service is scaled every 100 ms: every change reaches every
/// node, no member is declared dead, no message is refused for its key.
#[test]
fn rotation_under_load_loses_nothing() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let lab = Lab::up("snx-grot", 3, 3, 1.0)?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    // Every node on appnet for the whole test (a standalone task each).
    for i in 0..3 {
        lab.cli_ok(i, &["run", "--detach", "--name", &format!("keeper{i}"), "--network", "appnet", "--", "sleep", "3600"])?;
    }
    lab.cli_ok(0, &["service", "create", "--name", "churn", "--replicas", "1", "--network", "appnet", "--", "sleep", "3600"])?;
    lab.wait_service("churn", 1, T)?;
    let refused = |i: usize| -> Result<u64> {
        let v: Value = serde_json::from_str(&lab.cli_ok(i, &["network", "inspect", "appnet"])?)?;
        v["local_gossip"]["unauthenticated"].as_u64().context("local_gossip")
    };
    let before: Vec<u64> = (0..3).map(refused).collect::<Result<_>>()?;
    // `node ls` (from the manager): which key each node holds.
    let holders = |current: u64| -> Option<()> {
        let nodes = lab.cli_json(0, &["node", "ls"]).ok()?;
        let nodes = nodes.as_array()?;
        (nodes.len() == 3 && nodes.iter().all(|n| n["gossip_key"]["current"] == current && n["gossip_key"]["held"].as_array().is_some_and(|h| h.contains(&Value::from(current))))).then_some(())
    };
    wait_for("node ls: every node holding key 1", T, || holders(1))?;
    let stop = AtomicBool::new(false);
    let (rotations, scales) = std::thread::scope(|s| {
        let scaler = s.spawn(|| {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let replicas = format!("churn={}", 1 + n % 4);
                if lab.cli_ok(0, &["service", "scale", "--detach", &replicas]).is_ok() {
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            n
        });
        let r = (|| -> Result<Vec<String>> {
            std::thread::sleep(Duration::from_secs(1));
            let a = lab.cli_ok(0, &["swarm", "rotate-gossip-key"])?;
            std::thread::sleep(Duration::from_secs(1));
            let b = lab.cli_ok(0, &["swarm", "rotate-gossip-key"])?;
            std::thread::sleep(Duration::from_secs(1));
            Ok(vec![a, b])
        })();
        stop.store(true, Ordering::Relaxed);
        (r, scaler.join().unwrap_or(0))
    });
    let rotations = rotations?;
    assert_eq!(rotations, vec!["gossip key 2 is in use\n".to_string(), "gossip key 3 is in use\n".to_string()]);
    wait_for("node ls: every node holding key 3", T, || holders(3))?;
    let table = lab.cli_ok(0, &["node", "ls"])?;
    assert!(table.contains("GOSSIP KEY") && table.matches("current (3)").count() == 3, "node ls shows every node holding key 3:\n{table}");
    assert!(scales >= 20, "the service was scaled {scales} times during the rotations");
    lab.cli_ok(0, &["service", "scale", "churn=3"])?;
    let tasks = lab.wait_service("churn", 3, T)?;
    let mut want: Vec<String> = tasks.iter().filter_map(|t| t["id"].as_str().map(str::to_string)).collect();
    want.sort();
    for i in 0..3 {
        wait_for(&format!("node {} holding exactly the three churn tasks", i + 1), T, || {
            let v: Value = serde_json::from_str(&lab.cli_ok(i, &["network", "inspect", "appnet"]).ok()?).ok()?;
            let mut got: Vec<String> = v["local_endpoints"].as_array()?.iter().filter(|e| e["service"] == "churn").filter_map(|e| e["task_id"].as_str().map(str::to_string)).collect();
            got.sort();
            (got == want).then_some(())
        })?;
    }
    for (i, was) in before.iter().enumerate() {
        assert_eq!(refused(i)?, *was, "node {}: messages refused for their key during the rotations", i + 1);
        let log = lab.log(i);
        assert!(!log.contains("gossip: node down"), "node {}: a member was declared dead", i + 1);
        assert!(log.contains("send=3"), "node {} seals with key 3", i + 1);
        let keys: Value = serde_json::from_slice(&std::fs::read(lab.nodes[i].data_dir.join("node").join("gossip-keys.json"))?)?;
        let ids: Vec<u64> = keys["keys"].as_array().context("keys")?.iter().filter_map(|k| k["id"].as_u64()).collect();
        assert_eq!((ids, keys["send"].as_u64()), (vec![2, 3], Some(3)), "node {}: the previous key and the current one are kept", i + 1);
    }
    Ok(())
}

/// `node rm` of a stopped node: started again with its old data dir, it is refused on 2377
/// with the reason, and its gossip (sealed with the keys it kept) is refused by the others.
#[test]
fn a_removed_node_cannot_come_back() -> Result<()> {
    let mut lab = Lab::up("snx-grm", 3, 3, 1.0)?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    for i in 0..3 {
        lab.cli_ok(i, &["run", "--detach", "--name", &format!("keeper{i}"), "--network", "appnet", "--", "sleep", "3600"])?;
    }
    let n3 = lab.nodes[2].ns.clone();
    let e = lab.cli_err(0, &["node", "rm", &n3])?;
    assert!(e.contains("is up: stop it first, or remove it with --force"), "{e}");
    lab.stop_node(2, 9)?;
    wait_for("node 3 down", T, || {
        let nodes = lab.cli_json(0, &["node", "ls"]).ok()?;
        nodes.as_array()?.iter().any(|n| n["hostname"] == n3.as_str() && n["status"] == "down").then_some(())
    })?;
    let before: u64 = {
        let v: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "appnet"])?)?;
        v["local_gossip"]["unauthenticated"].as_u64().context("local_gossip")?
    };
    assert_eq!(lab.cli_ok(0, &["node", "rm", &n3])?.trim(), n3);
    let nodes = lab.cli_json(0, &["node", "ls"])?;
    assert!(!nodes.as_array().context("nodes")?.iter().any(|n| n["hostname"] == n3.as_str()), "{nodes}");
    // Back with its old data dir: its session is refused with the reason.
    lab.start_node(2)?;
    wait_for("node 3's daemon told it was removed", T, || lab.log(2).contains("was removed from this cluster").then_some(()))?;
    lab.stop_node(2, 9)?;
    // Its gossip, sealed with the keys it kept, is refused: endpoint packets sealed with
    // node 3's saved keys, sent from node 3's address.
    let net: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "appnet"])?)?;
    let net_id = net["id"].as_str().context("network id")?.to_string();
    let saved: Value = serde_json::from_slice(&std::fs::read(lab.nodes[2].data_dir.join("node").join("gossip-keys.json"))?)?;
    let keys: Vec<(u32, [u8; 32])> = saved["keys"]
        .as_array()
        .context("saved keys")?
        .iter()
        .map(|k| {
            let hex = k["key"].as_str().context("key")?;
            let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16)).collect::<Result<_, _>>()?;
            Ok((u32::try_from(k["id"].as_u64().context("id")?)?, <[u8; 32]>::try_from(bytes.as_slice())?))
        })
        .collect::<Result<_>>()?;
    let ring = Keyring::with_send(&keys, u32::try_from(saved["send"].as_u64().unwrap_or(0))?).map_err(anyhow::Error::msg)?;
    let ip = std::net::Ipv4Addr::new(10, 0, 0, 201);
    let ep = forged(&net_id, "ghost", ip, "10.210.0.3")?;
    let item = Item { owner: "removed".into(), gen: 1, version: 1, network: net_id, id: ep.id.clone(), value: Some(std::sync::Arc::new(ep)) };
    let pkt = ring.seal(&Gossip::plaintext_items(vec![item]).context("encode")?, now_ms()).map_err(anyhow::Error::msg)?;
    let f = lab.nodes[2].data_dir.join("ghost.pkt");
    std::fs::write(&f, &pkt)?;
    let send = script("send_udp.py");
    for _ in 0..3 {
        in_ns(&n3, &["python3", &send, "10.210.0.1", "7946", &f.display().to_string()])?;
    }
    wait_for("node 1 refusing the removed node's gossip", T, || {
        let v: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "appnet"]).ok()?).ok()?;
        (v["local_gossip"]["unauthenticated"].as_u64()? >= before + 3).then_some(())
    })?;
    std::thread::sleep(Duration::from_secs(1));
    for i in 0..2 {
        let v: Value = serde_json::from_str(&lab.cli_ok(i, &["network", "inspect", "appnet"])?)?;
        let eps = v["local_endpoints"].as_array().context("local endpoints")?;
        assert!(!eps.iter().any(|e| e["task_id"] == "ghost" || e["vtep"] == "10.210.0.3"), "node {}: an endpoint of the removed node: {v}", i + 1);
    }
    let nodes = lab.cli_json(0, &["node", "ls"])?;
    assert_eq!(nodes.as_array().map(|a| a.len()), Some(2), "{nodes}");
    Ok(())
}

/// A host outside the cluster opens connections to a node's 7946 and sends what it likes.
/// `mode`: `fast` (a 16 MiB length prefix, then 16 MiB as fast as the node takes it),
/// `slow` (the same prefix, then a trickle), `frame` (a first frame of a plausible size,
/// garbage, then the 16 MiB frame). Prints how many connections the node closed and the
/// most bytes one of them got in before that.
const STRANGER: &str = r#"
import socket, sys, threading, time
host, port, n, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
results = []
lock = threading.Lock()
def one():
    sent, closed = 0, False
    try:
        c = socket.create_connection((host, port), timeout=5)
        if mode == "frame":
            c.sendall((1000).to_bytes(4, "big") + bytes(1000))
        c.sendall((16 << 20).to_bytes(4, "big"))
        chunk = bytes(64 << 10) if mode != "slow" else bytes(1024)
        end = time.time() + 15
        while sent < (16 << 20) and time.time() < end:
            c.sendall(chunk)
            sent += len(chunk)
            if mode == "slow":
                time.sleep(0.05)
    except OSError:
        closed = True
    with lock:
        results.append((sent, closed))
ts = [threading.Thread(target=one) for _ in range(n)]
for t in ts: t.start()
for t in ts: t.join()
print("conns=%d closed=%d max_sent=%d" % (len(results), sum(1 for _, c in results if c), max(s for s, _ in results)))
"#;

fn rss_kb(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).context("VmRSS")
}

/// 20 connections from a stranger, each announcing a 16 MiB frame and sending it (fast,
/// slowly, or after a first frame of garbage), cost the agent at most 8 MB: a stream's chunks
/// are opened one by one, and before a peer has proven that it holds the gossip key it can
/// make the node hold one small first chunk per connection (before issue 19: +75 MB).
/// Every such connection is closed, each is counted, and gossip goes on.
#[test]
fn a_stranger_cannot_fill_a_nodes_memory_on_7946() -> Result<()> {
    let lab = Lab::up("snx-gmem", 2, 2, 1.0)?;
    let pid = lab.daemon_pid(1).context("node 2's daemon")?;
    let host = lab.nodes[1].addr.clone();
    let cl = lab.outside_client()?;
    std::thread::sleep(Duration::from_secs(2));
    let before = rss_kb(pid)?;
    let mut peak = before;
    let mut lines = Vec::new();
    for mode in ["fast", "slow", "frame"] {
        let child = std::process::Command::new("ip").args(["netns", "exec", &cl, "python3", "-c", STRANGER, &host, "7946", "20", mode]).stdout(std::process::Stdio::piped()).spawn()?;
        let pid_c = child.id();
        while swarmnet_lab::pid_alive(pid_c) {
            peak = peak.max(rss_kb(pid)?);
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = String::from_utf8_lossy(&child.wait_with_output()?.stdout).trim().to_string();
        assert!(out.contains("conns=20 closed=20"), "{mode}: every stranger's connection is closed by the node: {out}");
        lines.push(format!("{mode}: {out}"));
    }
    let growth_mb = peak.saturating_sub(before) as f64 / 1024.0;
    println!("SECURITY 7946 stranger: 3 x 20 connections of 16 MiB frames: RSS {before} kB -> peak +{growth_mb:.1} MB; {}", lines.join("; "));
    assert!(growth_mb <= 8.0, "a stranger made the agent grow by {growth_mb:.1} MB ({})", lines.join("; "));
    // The 20 `frame` connections opened nothing: each is counted as unauthenticated.
    lab.cli_ok(0, &["network", "create", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "after", "--replicas", "2", "--network", "appnet", "--", "sleep", "3600"])?;
    lab.wait_service("after", 2, T)?;
    let v = wait_for("node 2 holding both tasks' entries", T, || {
        let v: Value = serde_json::from_str(&lab.cli_ok(1, &["network", "inspect", "appnet"]).ok()?).ok()?;
        (v["local_endpoints"].as_array()?.len() == 2).then_some(v)
    })?;
    let refused = v["local_gossip"]["unauthenticated"].as_u64().context("counter")?;
    assert!(refused >= 20, "node 2 counted the garbage first frames: {v}");
    Ok(())
}
