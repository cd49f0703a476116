//! `cargo xtask bench convergence`: on the 3-node lab, from a task's endpoint being published
//! on its node to its neighbour and FDB entries being in the kernel of every other node
//! (kernel timestamps from `ip -ts monitor neigh` in each sandbox), and end to end from the
//! `service scale` call.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use crate::p50_p99_max;
use anyhow::{Context, Result};
use serde_json::Value;
use swarmnet_lab::{wait_for, Lab};

/// "[2026-11-24T03:46:16.818824] ..." -> seconds since the epoch.
fn ts(line: &str) -> Option<f64> {
    let t = line.strip_prefix('[')?.split(']').next()?;
    log_ts(&format!("{t}Z"))
}

/// "2026-11-24T03:46:16.818824Z" -> seconds since the epoch (UTC).
pub(crate) fn log_ts(t: &str) -> Option<f64> {
    let (date, time) = t.trim_end_matches('Z').split_once('T')?;
    let d: Vec<i64> = date.split('-').filter_map(|x| x.parse().ok()).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms.split(':').filter_map(|x| x.parse().ok()).collect();
    if d.len() != 3 || h.len() != 3 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 { (d[0] - 1, d[1] + 9) } else { (d[0], d[1] - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + h[0] * 3600 + h[1] * 60 + h[2];
    Some(secs as f64 + format!("0.{frac}").parse::<f64>().ok()?)
}

/// When a daemon log says the endpoint of task `task_id` was published (seconds since the
/// epoch), from the first such line.
pub(crate) fn published_at(log: &str, task_id: &str) -> Option<f64> {
    log.lines().find(|l| l.contains("endpoint published") && l.contains(task_id)).and_then(|l| l.split_whitespace().next()).and_then(log_ts)
}

pub fn bench_convergence(trials: usize) -> Result<()> {
    let lab = Lab::up("snbench", 3, 3, 5.0)?;
    lab.cli_ok(0, &["network", "create", "conv"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "conv", "--", "sleep", "3600"])?;
    lab.wait_service("web", 3, Duration::from_secs(30))?;
    let net: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "conv"])?)?;
    let net_id = net["id"].as_str().context("id")?.to_string();
    let mut monitors: Vec<Child> = Vec::new();
    let mut logs = Vec::new();
    for i in 0..3 {
        let holders: Value = serde_json::from_slice(&std::fs::read(lab.nodes[i].data_dir.join("sandboxes").join("state.json"))?)?;
        let pid = holders[&net_id]["pid"].as_u64().context("sandbox")?.to_string();
        let log = lab.nodes[i].data_dir.join("neigh-monitor.log");
        let f = std::fs::File::create(&log)?;
        monitors.push(Command::new("nsenter").args(["-t", &pid, "-n", "--", "ip", "-ts", "monitor", "neigh"]).stdout(f).stderr(Stdio::null()).spawn()?);
        logs.push(log);
    }
    // Past the agents' start-up warm-up (during which stale entries are kept, so a trial
    // that reuses the previous trial's address would see no kernel event).
    std::thread::sleep(Duration::from_secs(6));
    let (mut gossip, mut e2e) = (Vec::new(), Vec::new());
    for trial in 0..trials {
        let offsets: Vec<usize> = logs.iter().map(|l| std::fs::read_to_string(l).map(|s| s.len()).unwrap_or(0)).collect();
        let daemon_offsets: Vec<usize> = (0..3).map(|i| lab.log(i).len()).collect();
        let t0 = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs_f64();
        lab.cli_ok(0, &["service", "scale", "--detach", "web=4"])?;
        let new = wait_for("the 4th task", Duration::from_secs(30), || {
            let v = lab.cli_json(0, &["service", "ps", "web"]).ok()?;
            v.as_array()?.iter().find(|t| t["name"] == "web.4" && t["state"] == "running").cloned()
        })?;
        let ip = new["addresses"]["conv"].as_str().context("ip")?.to_string();
        let task_id = new["id"].as_str().context("id")?.to_string();
        let origin = lab.nodes.iter().position(|n| n.ns == new["node"].as_str().unwrap_or("")).context("node")?;
        let o: Vec<u8> = ip.split('.').filter_map(|x| x.parse().ok()).collect();
        let mac = format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
        // The latest of (neighbour added, FDB added) on each other node.
        let done = wait_for("entries on the other nodes", Duration::from_secs(30), || {
            let mut last: f64 = 0.0;
            for i in (0..3).filter(|i| *i != origin) {
                let text = std::fs::read_to_string(&logs[i]).ok()?;
                let new_lines = &text[offsets[i].min(text.len())..];
                let added = |pred: &dyn Fn(&str) -> bool| new_lines.lines().filter(|l| !l.contains("Deleted") && pred(l)).filter_map(ts).next();
                let neigh = added(&|l: &str| l.contains(&format!("] {ip} ")) && l.contains(&mac))?;
                let fdb = added(&|l: &str| !l.contains(&format!("] {ip} ")) && l.contains(&mac))?;
                last = last.max(neigh.max(fdb));
            }
            Some(last)
        })?;
        let log = lab.log(origin);
        let published = published_at(&log[daemon_offsets[origin].min(log.len())..], &task_id).context("publish time in the origin's log")?;
        gossip.push((done - published) * 1000.0);
        e2e.push((done - t0) * 1000.0);
        lab.cli_ok(0, &["service", "scale", "--detach", "web=3"])?;
        wait_for("back to 3", Duration::from_secs(30), || {
            let v = lab.cli_json(0, &["service", "ps", "web"]).ok()?;
            (v.as_array()?.len() == 3).then_some(())
        })?;
        if trial % 10 == 9 {
            println!("{} trials done", trial + 1);
        }
    }
    for m in &mut monitors {
        let _ = m.kill();
        let _ = m.wait();
    }
    println!("published -> neighbour+FDB on every other node: trials={trials} {}", p50_p99_max(&mut gossip));
    println!("service scale call -> entries on every other node: {}", p50_p99_max(&mut e2e));
    Ok(())
}
