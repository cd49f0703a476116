//! `cargo xtask bench docker-api` (release build): the Docker API's `/tasks` with 10,000
//! tasks (issue 21: ≤ 200 ms). A 2-node lab; a service of 10,000 replicas that no node may
//! run (a constraint no node meets) keeps 10,000 tasks in the manager's state without
//! 10,000 processes. Timed: `GET /v1.41/tasks` on the manager's socket and on the worker's
//! (forwarded to the manager), each 20 times; in the same run, as the reference, swarmnet's
//! own `service ps huge --format json` (the same tasks through swarmnet's API and CLI).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use swarmnet_lab::{wait_for, Lab, LAB_DOCKER_SOCKET};

use crate::p50_p99_max;

fn timed(mut f: impl FnMut() -> Result<usize>, n: usize) -> Result<(Vec<f64>, usize)> {
    let mut v = Vec::new();
    let mut size = 0;
    for _ in 0..n {
        let t = Instant::now();
        size = f()?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((v, size))
}

pub fn bench_docker_api() -> Result<()> {
    let lab = Lab::up("snbench", 2, 2, 5.0)?;
    lab.cli_ok(0, &["service", "create", "--detach", "--name", "huge", "--replicas", "10000", "--constraint", "node.labels.nowhere==1", "--", "sleep", "infinity"])?;
    let get = |i: usize| -> Result<usize> {
        let out = Command::new("curl").args(["-sSf", "--unix-socket"]).arg(lab.nodes[i].data_dir.join(LAB_DOCKER_SOCKET)).arg("http://docker/v1.41/tasks").output()?;
        anyhow::ensure!(out.status.success(), "GET /tasks: {}", String::from_utf8_lossy(&out.stderr));
        Ok(out.stdout.len())
    };
    let count = wait_for("10,000 tasks in /tasks", Duration::from_secs(60), || {
        let out = Command::new("curl").args(["-sSf", "--unix-socket"]).arg(lab.nodes[0].data_dir.join(LAB_DOCKER_SOCKET)).arg("http://docker/v1.41/tasks").output().ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let n = v.as_array()?.len();
        (n >= 10_000).then_some(n)
    })?;
    let (mut mgr, size) = timed(|| get(0), 20)?;
    let (mut wkr, _) = timed(|| get(1), 20)?;
    let (mut ours, _) = timed(|| Ok(lab.cli_ok(0, &["service", "ps", "huge", "--format", "json"]).context("service ps")?.len()), 20)?;
    println!("\nfigures (for docs/benchmarks.md): GET /v1.41/tasks with {count} tasks ({:.1} MB of JSON), 20 times each", size as f64 / 1e6);
    println!("  manager's socket:            {}", p50_p99_max(&mut mgr));
    println!("  worker's socket (forwarded): {}", p50_p99_max(&mut wkr));
    println!("  reference, swarmnet service ps huge --format json on the manager: {}", p50_p99_max(&mut ours));
    Ok(())
}
