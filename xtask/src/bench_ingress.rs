//! `cargo xtask bench ingress` (release build): requests per second and latency from a
//! client outside the cluster (the lab's outside namespace, wrk) to one nginx task:
//! - through the routing mesh on a node that runs no task (`*:8080`, ingress mode),
//! - against the same task published in host mode on its own node (`:8081`, the baseline),
//! - through the mesh on the task's own node (`*:8080` there: the local path).
//!
//! With HTTP keep-alive and with `Connection: close`, three back-to-back rounds each. One
//! service publishes both ports, so every figure is the same nginx process. A round gives
//! each path 8 s in four 2 s slices, taken in turn (host, mesh, local, host again, then the
//! other way round): this machine's neighbours come and go within seconds, and two figures
//! taken 8 s apart measured them as much as the paths (see docs/benchmarks.md). Host mode
//! measured twice (against itself) shows how much of a ratio is noise.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use swarmnet_lab::{wait_for, Lab};

use crate::bench_lb::{parse_wrk, Wrk, NGINX};

const LAB: &str = "snbench";
const T: Duration = Duration::from_secs(60);

/// Slices of equal length as one figure: mean requests/s, median p50, the worst p99, all
/// errors.
fn combine(v: &[Wrk]) -> Wrk {
    let n = v.len().max(1) as f64;
    let mut p50: Vec<f64> = v.iter().map(|w| w.p50_ms).collect();
    p50.sort_by(f64::total_cmp);
    Wrk {
        rps: v.iter().map(|w| w.rps).sum::<f64>() / n,
        p50_ms: p50.get(p50.len() / 2).copied().unwrap_or(0.0),
        p99_ms: v.iter().map(|w| w.p99_ms).fold(0.0, f64::max),
        errors: v.iter().map(|w| w.errors).sum(),
    }
}

fn wrk(ns: &str, url: &str, close: bool) -> Result<Wrk> {
    wrk_for(ns, url, close, "8s")
}

fn wrk_for(ns: &str, url: &str, close: bool, d: &str) -> Result<Wrk> {
    let d = format!("-d{d}");
    let mut a = vec!["netns", "exec", ns, "wrk", "-t1", "-c32", d.as_str(), "--latency"];
    if close {
        a.extend_from_slice(&["-H", "Connection: close"]);
    }
    a.push(url);
    let out = Command::new("ip").args(&a).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("wrk {url} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text).with_context(|| format!("wrk output:\n{text}"))
}

pub fn bench_ingress() -> Result<()> {
    let lab = Lab::up(LAB, 3, 3, 5.0)?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "1", "--publish", "8080:80", "--publish", "published=8081,target=80,mode=host", "--", "sh", "-c", NGINX])?;
    let tasks = lab.wait_service("web", 1, T)?;
    let host = tasks[0]["node"].as_str().context("task node")?.to_string();
    let on = lab.nodes.iter().position(|n| n.ns == host).context("the task's node")?;
    let off = (0..3).find(|&i| i != on).context("a node without the task")?;
    // One outside client per path: a client's ports, reused across paths that end in the
    // same task, would meet that task's TIME_WAIT sockets of another path (whose timestamps
    // run on another clock) and lose SYNs to PAWS: an artefact of the benchmark, not of a
    // path.
    let cl = lab.outside_client_at(0)?;
    let cl_host = lab.outside_client_at(1)?;
    let cl_local = lab.outside_client_at(2)?;
    let mesh = format!("http://{}:8080/", lab.nodes[off].addr);
    let hostmode = format!("http://{}:8081/", lab.nodes[on].addr);
    let local = format!("http://{}:8080/", lab.nodes[on].addr);
    for (ns, url) in [(&cl, &mesh), (&cl_host, &hostmode), (&cl_local, &local)] {
        wait_for(&format!("nginx answering on {url}"), T, || {
            let out = Command::new("ip").args(["netns", "exec", ns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url]).output().ok()?;
            (String::from_utf8_lossy(&out.stdout).trim() == "200").then_some(())
        })?;
    }
    println!("task on node {} ({host}); mesh entry: node {}; clients outside the cluster: {cl} (mesh), {cl_host} (host mode), {cl_local} (mesh via the task's node)", on + 1, off + 1);
    for close in [false, true] {
        let mode = if close { "Connection: close" } else { "keep-alive" };
        // Uncounted warm-up of each path.
        for (ns, url) in [(&cl_host, &hostmode), (&cl, &mesh), (&cl_local, &local)] {
            wrk(ns, url, close)?;
        }
        let mut worst = f64::INFINITY;
        let mut worst_local = f64::INFINITY;
        for round in 1..=3 {
            // The fourth path is host mode again: host mode against itself is this machine's
            // noise, printed beside the ratios.
            let paths = [(&cl_host, &hostmode), (&cl, &mesh), (&cl_local, &local), (&cl_host, &hostmode)];
            let mut got: [Vec<Wrk>; 4] = Default::default();
            for slice in 0..4 {
                let order: [usize; 4] = if slice % 2 == 0 { [0, 1, 2, 3] } else { [3, 2, 1, 0] };
                for i in order {
                    got[i].push(wrk_for(paths[i].0, paths[i].1, close, "2s")?);
                }
            }
            let [h, m, l, h2] = got.map(|v| combine(&v));
            let aa = h2.rps / h.rps;
            let (rm, rl) = (m.rps / h.rps, l.rps / h.rps);
            worst = worst.min(rm);
            worst_local = worst_local.min(rl);
            println!(
                "[{mode}] round {round}: host mode {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms, errors {}); mesh via a node without the task {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms, errors {}) = {rm:.3}x; mesh via the task's node {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms, errors {}) = {rl:.3}x; host mode again {:.0} req/s = {aa:.3}x (the noise)",
                h.rps, h.p50_ms, h.p99_ms, h.errors, m.rps, m.p50_ms, m.p99_ms, m.errors, l.rps, l.p50_ms, l.p99_ms, l.errors, h2.rps
            );
        }
        println!("[{mode}] worst mesh/host-mode ratio over the 3 rounds: {worst:.3} (via the task's node: {worst_local:.3})");
    }
    println!("{}", lab.cli_ok(off, &["lb", "ls"])?);
    // Which path carried the mesh's flows at the entry node: the kernel's table counts only
    // what the eBPF entry left to it.
    let out = Command::new("ip").args(["netns", "exec", &lab.nodes[off].ns, "nft", "list", "table", "ip", "swarmnet-ingress"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines().filter(|l| l.contains("counter")) {
        println!("node {} table (flows the eBPF entry left to nftables): {}", off + 1, l.trim());
    }
    drop(lab);
    let _ = std::fs::remove_dir_all("/tmp/snbench-nginx");
    Ok(())
}
