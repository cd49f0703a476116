//! `cargo xtask bench logs`: the delay of `service logs -f` (issue 21), from a task writing
//! a line to the CLI on another node printing it. The task prints its clock (ns) every
//! 10 ms; the delay of each line is the time the benchmark reads it minus the time in it.
//! Baseline in the same run: `tail -F` of the task's own log file on its node (the log
//! writer and the file alone, no network, no manager).

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use swarmnet_lab::Lab;

use crate::p50_p99_max;

fn now_ns() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as f64).unwrap_or(0.0)
}

/// Reads `child`'s stdout for `secs`, each line's delay in ms (`stamp` takes the stamp out
/// of a line); returns the delays.
fn delays(child: &mut std::process::Child, secs: u64, stamp: impl Fn(&str) -> Option<f64>) -> Result<Vec<f64>> {
    let out = child.stdout.take().context("stdout")?;
    let mut r = std::io::BufReader::new(out);
    let mut v = Vec::new();
    let until = Instant::now() + Duration::from_secs(secs);
    let mut line = String::new();
    while Instant::now() < until {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let now = now_ns();
        if let Some(t) = stamp(line.trim()) {
            v.push((now - t) / 1e6);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(v)
}

pub fn bench_logs(secs: u64) -> Result<()> {
    let lab = Lab::up("snbench-logs", 2, 2, 1.0)?;
    let host2 = lab.nodes[1].hostname.clone();
    let constraint = format!("node.hostname=={host2}");
    lab.cli_ok(0, &["service", "create", "--name", "stamp", "--constraint", &constraint, "--", "sh", "-c", "while true; do date +%s%N; sleep 0.01; done"])?;
    let task = lab.running_tasks("stamp")?.first().cloned().context("stamp's task")?;
    let id = task["id"].as_str().context("task id")?.to_string();
    let file = lab.nodes[1].data_dir.join("tasks").join(format!("{id}.log"));
    std::thread::sleep(Duration::from_secs(1));

    // Baseline: the file on the task's node, as it is written.
    let mut tail = Command::new("tail").args(["-F", "-n", "0"]).arg(&file).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let base = delays(&mut tail, secs, |l| l.rsplit(' ').next()?.parse::<f64>().ok())?;
    // swarmnet service logs -f on the other node (the manager's).
    let mut cli = Command::new(&lab.bin).args(["--host", &lab.control(0), "service", "logs", "-f", "--tail", "0", "--raw", "stamp"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let ours = delays(&mut cli, secs, |l| l.parse::<f64>().ok())?;
    anyhow::ensure!(base.len() > 100 && ours.len() > 100, "too few lines: baseline {}, service logs {}", base.len(), ours.len());
    let (mut base, mut ours) = (base, ours);
    let p99 = |v: &mut [f64]| {
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 * 0.99) as usize).min(v.len() - 1)]
    };
    let (b99, o99) = (p99(&mut base), p99(&mut ours));
    println!("\nfigures (for docs/benchmarks.md): line delay, task writes -> reader prints, {secs} s, a line every 10 ms");
    println!("  baseline  tail -F of the task's log file on its node: {} ({} lines)", p50_p99_max(&mut base), base.len());
    println!("  swarmnet  service logs -f from the other node:        {} ({} lines)", p50_p99_max(&mut ours), ours.len());
    println!("  p99 service logs -f / p99 baseline: {:.1} ms / {:.1} ms (target: p99 <= 200 ms)", o99, b99);
    Ok(())
}
