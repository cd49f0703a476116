//! `cargo xtask bench overlay`: single-stream TCP throughput (iperf3), task to task across
//! nodes through swarmnet's overlay, against (a) the same node namespaces over the plain
//! underlay and (b) a hand-built kernel VXLAN overlay of the same shape (bridge + vxlan in a
//! sandbox namespace, static FDB/neighbour, MTU 1450), all in one lab and one run.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use swarmnet_lab::{wait_for, Lab};

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// iperf3 client: `prefix` enters the client's namespace; returns Gbit/s received.
fn iperf(prefix: &[&str], server: &str, port: u16, secs: u32) -> Result<f64> {
    let p = port.to_string();
    let t = secs.to_string();
    let mut a: Vec<&str> = prefix.to_vec();
    a.extend(["iperf3", "-c", server, "-p", &p, "-t", &t, "-J"]);
    let v: Value = serde_json::from_str(&run(&a)?)?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")?;
    Ok(bps / 1e9)
}

fn server(prefix: &[&str], port: u16) -> Result<Child> {
    let p = port.to_string();
    let mut a: Vec<&str> = prefix.to_vec();
    a.extend(["iperf3", "-s", "-p", &p]);
    Ok(Command::new(a[0]).args(&a[1..]).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?)
}

/// Builds the hand-made overlay between lab nodes 3 and 4: returns the two task namespaces.
fn hand_built(lab: &Lab) -> Result<(String, String)> {
    let name = &lab.name;
    let vni = "9000";
    for (k, peer) in [(3u8, 4u8), (4, 3)] {
        let node = format!("{name}-n{k}");
        let sb = format!("{name}-hb{k}");
        let task = format!("{name}-ht{k}");
        let me_ip = format!("10.99.0.{k}");
        let peer_ip = format!("10.99.0.{peer}");
        let me_mac = format!("02:42:0a:63:00:{k:02x}");
        let peer_mac = format!("02:42:0a:63:00:{peer:02x}");
        let peer_vtep = format!("10.210.0.{peer}");
        let local = format!("10.210.0.{k}");
        for cmd in [
            vec!["ip", "netns", "add", sb.as_str()],
            vec!["ip", "netns", "add", task.as_str()],
            vec!["ip", "-n", &node, "link", "add", "snhvx", "type", "vxlan", "id", vni, "dstport", "4789", "local", &local, "nolearning", "proxy"],
            vec!["ip", "-n", &node, "link", "set", "snhvx", "netns", &sb],
            vec!["ip", "-n", &sb, "link", "add", "br0", "type", "bridge"],
            vec!["ip", "-n", &sb, "link", "set", "br0", "mtu", "1450", "up"],
            vec!["ip", "-n", &sb, "link", "set", "snhvx", "master", "br0", "mtu", "1450", "up"],
            vec!["ip", "-n", &sb, "link", "add", "snhv", "type", "veth", "peer", "name", "eth0", "netns", &task],
            vec!["ip", "-n", &sb, "link", "set", "snhv", "master", "br0", "mtu", "1450", "up"],
            vec!["ip", "-n", &task, "link", "set", "eth0", "address", &me_mac, "mtu", "1450", "up"],
            vec!["ip", "-n", &task, "addr", "add", &format!("{me_ip}/24"), "dev", "eth0"],
            vec!["ip", "-n", &sb, "neigh", "add", &peer_ip, "lladdr", &peer_mac, "dev", "snhvx", "nud", "permanent"],
            vec!["ip", "netns", "exec", &sb, "bridge", "fdb", "add", &peer_mac, "dev", "snhvx", "dst", &peer_vtep, "self", "permanent"],
        ] {
            run(&cmd)?;
        }
    }
    Ok((format!("{name}-ht3"), format!("{name}-ht4")))
}

pub fn bench_overlay(secs: u32, rounds: usize) -> Result<()> {
    // Nodes 1-2 run swarmnet; nodes 3-4 carry the hand-built overlay.
    let lab = Lab::up("snbench", 4, 2, 5.0)?;
    lab.cli_ok(0, &["network", "create", "perf"])?;
    lab.cli_ok(0, &["service", "create", "--name", "iperf", "--replicas", "2", "--network", "perf", "--", "iperf3", "-s", "-p", "5201"])?;
    let tasks = lab.wait_service("iperf", 2, Duration::from_secs(30))?;
    let on = |n: &str| tasks.iter().find(|t| t["node"] == n).cloned().context("task placement");
    let client = on("snbench-n1")?;
    let srv = on("snbench-n2")?;
    let client_pid = client["pid"].as_u64().context("pid")?.to_string();
    let srv_ip = srv["addresses"]["perf"].as_str().context("ip")?.to_string();
    let sw_prefix = ["nsenter", "-t", client_pid.as_str(), "-n", "--"];
    wait_for("overlay path", Duration::from_secs(30), || iperf(&sw_prefix, &srv_ip, 5201, 1).ok())?;

    let n1 = ["ip", "netns", "exec", "snbench-n1"];
    let mut under_srv = server(&["ip", "netns", "exec", "snbench-n2"], 5301)?;
    let (ht3, ht4) = hand_built(&lab)?;
    let hb_prefix = ["ip", "netns", "exec", ht3.as_str()];
    let mut hb_srv = server(&["ip", "netns", "exec", ht4.as_str()], 5401)?;
    wait_for("underlay server", Duration::from_secs(10), || iperf(&n1, "10.210.0.2", 5301, 1).ok())?;
    wait_for("hand-built path", Duration::from_secs(10), || iperf(&hb_prefix, "10.99.0.4", 5401, 1).ok())?;

    let (mut u, mut h, mut s) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        u.push(iperf(&n1, "10.210.0.2", 5301, secs)?);
        h.push(iperf(&hb_prefix, "10.99.0.4", 5401, secs)?);
        s.push(iperf(&sw_prefix, &srv_ip, 5201, secs)?);
        println!("round {}: underlay {:.2} Gbit/s, hand-built vxlan {:.2} Gbit/s, swarmnet {:.2} Gbit/s", r + 1, u[r], h[r], s[r]);
    }
    let _ = under_srv.kill();
    let _ = hb_srv.kill();
    let _ = under_srv.wait();
    let _ = hb_srv.wait();
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (u, h, s) = (med(&mut u), med(&mut h), med(&mut s));
    println!(
        "median of {rounds} x {secs} s: underlay {u:.2} Gbit/s; hand-built vxlan {h:.2} Gbit/s ({:.2} of underlay); swarmnet {s:.2} Gbit/s ({:.2} of underlay, {:.2} of hand-built)",
        h / u,
        s / u,
        s / h
    );
    Ok(())
}
