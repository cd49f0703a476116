//! `cargo xtask bench ha` (issue 20, ADR 0022): managers on etcd.
//!
//! - `service create` → its tasks running, on a cluster kept in etcd (3 members) against one
//!   kept in redb, the two labs up side by side and the runs alternating;
//! - the leader `kill -9` (2 managers, 3 etcd members, 1 worker): → the other manager says
//!   it leads, → the first `service create` that succeeds, → the worker's session open on
//!   the new leader (its log's timestamp); the killed manager is started again (it stands
//!   by) before the next kill, so the kills alternate between the two;
//! - 10,000 services in etcd: the daemon's RSS, and how long a manager started again takes
//!   to lead and answer `node ls`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use swarmnet_lab::{wait_for, Lab};

use crate::bench_convergence::log_ts;
use crate::p50_p99_max;

const T: Duration = Duration::from_secs(60);

fn epoch() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The index of the node whose manager leads, as node `ask` says (None: no answer, or no
/// leader yet).
fn leader(lab: &Lab, ask: usize) -> Option<usize> {
    let v = lab.cli_json(ask, &["node", "ls"]).ok()?;
    let host = v.as_array()?.iter().find(|n| n["manager_status"] == "Leader")?["hostname"].as_str()?.to_string();
    lab.nodes.iter().position(|n| n.hostname == host)
}

fn rss_mib(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).context("VmRSS")?;
    Ok(kb / 1024.0)
}

/// One `service create --replicas 3` to 3 running tasks, then its removal (waited for).
fn create_to_running(lab: &Lab, name: &str) -> Result<f64> {
    let t = Instant::now();
    lab.cli_ok(0, &["service", "create", "--name", name, "--replicas", "3", "--network", "benchnet", "--", "sleep", "3600"])?;
    wait_for("3 running", T, || (lab.running_tasks(name).ok()?.len() == 3).then_some(()))?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    lab.cli_ok(0, &["service", "rm", name])?;
    wait_for("removed tasks gone", T, || lab.cli_json(0, &["service", "ps", name]).is_err().then_some(()))?;
    Ok(ms)
}

pub fn bench_ha(runs: usize) -> Result<()> {
    // 1. create → running, etcd against redb.
    {
        let redb = Lab::up("snbench", 3, 3, 1.0)?;
        let etcd = Lab::up_etcd("snbench-e", 3, 3, 1.0, 3, 1, &[])?;
        for lab in [&redb, &etcd] {
            lab.cli_ok(0, &["network", "create", "benchnet"])?;
        }
        let (mut r, mut e) = (Vec::new(), Vec::new());
        for i in 0..runs {
            r.push(create_to_running(&redb, &format!("b{i}"))?);
            e.push(create_to_running(&etcd, &format!("b{i}"))?);
        }
        let (rp, ep) = (crate::pct(&mut r, 50.0), crate::pct(&mut e, 50.0));
        println!("BENCH ha create→running (3 replicas, {runs} runs each, alternating): redb {}; etcd (3 members) {}; etcd/redb p50 = {:.2}", p50_p99_max(&mut r), p50_p99_max(&mut e), ep / rp);
    }

    // 2. The leader killed, `runs` times.
    let mut lab = Lab::up_etcd("snbench-f", 3, 3, 1.0, 3, 2, &[])?;
    lab.cli_ok(0, &["network", "create", "benchnet"])?;
    let worker = 2;
    let (mut elected, mut created, mut session) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..runs {
        let l = wait_for("a leader", T, || leader(&lab, 0).or_else(|| leader(&lab, 1)))?;
        let other = 1 - l;
        wait_for("the other manager standing by", T, || {
            let v = lab.cli_json(l, &["node", "ls"]).ok()?;
            v.as_array()?.iter().any(|n| n["hostname"] == lab.nodes[other].hostname.as_str() && n["manager_status"] == "Reachable" && n["status"] == "ready").then_some(())
        })?;
        // The worker's session is with the leader before the kill.
        std::thread::sleep(Duration::from_millis(500));
        let (t0, e0) = (Instant::now(), epoch());
        lab.stop_node(l, crate::SIGKILL)?;
        wait_for("the other manager to lead", T, || (leader(&lab, other) == Some(other)).then_some(()))?;
        elected.push(t0.elapsed().as_secs_f64() * 1000.0);
        let name = format!("f{k}");
        wait_for("a service create that succeeds", T, || lab.cli_ok(other, &["service", "create", "--detach", "--name", &name, "--replicas", "0", "--network", "benchnet", "--", "true"]).ok())?;
        created.push(t0.elapsed().as_secs_f64() * 1000.0);
        let addr = format!("manager={}:2377", lab.nodes[other].addr);
        let opened = wait_for("the worker's session on the new leader", T, || {
            let log = std::fs::read_to_string(lab.nodes[worker].data_dir.join("daemon.log")).ok()?;
            log.lines().filter(|l| l.contains("session open") && l.contains(&addr)).filter_map(|l| l.split_whitespace().next().and_then(log_ts)).find(|t| *t > e0)
        })?;
        session.push((opened - e0) * 1000.0);
        lab.start_node(l)?;
    }
    println!(
        "BENCH ha failover (leader kill -9, lease 2 s, {runs} kills): → new leader {}; → first service create done {}; → worker's session on the new leader {}",
        p50_p99_max(&mut elected),
        p50_p99_max(&mut created),
        p50_p99_max(&mut session)
    );
    drop(lab);

    // 3. 10,000 services in etcd.
    let mut lab = Lab::up_etcd("snbench-m", 1, 1, 1.0, 3, 1, &[])?;
    lab.cli_ok(0, &["network", "create", "--subnet", "10.100.0.0/16", "benchnet"])?;
    let n = 10_000;
    let t = Instant::now();
    for i in 0..n {
        lab.cli_ok(0, &["service", "create", "--detach", "--name", &format!("s{i}"), "--replicas", "0", "--network", "benchnet", "--", "true"])?;
    }
    let per = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
    let pid = lab.daemon_pid(0).context("daemon pid")?;
    let rss = rss_mib(pid)?;
    lab.stop_node(0, crate::SIGTERM)?;
    let t = Instant::now();
    lab.start_node(0)?;
    wait_for("the manager to lead and answer", Duration::from_secs(120), || (leader(&lab, 0) == Some(0)).then_some(()))?;
    let load = t.elapsed().as_secs_f64();
    let svcs = lab.cli_json(0, &["service", "ls"])?.as_array().map_or(0, Vec::len);
    if svcs != n {
        bail!("{svcs} services after the restart, not {n}");
    }
    let rss_after = rss_mib(lab.daemon_pid(0).context("daemon pid")?)?;
    println!("BENCH ha 10,000 services in etcd: created at {per:.1} ms each (CLI included); daemon RSS {rss:.1} MiB, {rss_after:.1} MiB after a restart; a manager started again leads and answers node ls after {load:.2} s (the stopped one resigned its lease)");
    Ok(())
}
