//! `cargo xtask bench metrics` (release build): what `--metrics-addr` costs (issue 21), the
//! same 3-node lab made with metrics off (no listener, nobody scrapes) and on (every daemon
//! scraped every second by a client on the underlay, more often than Prometheus's 15 s
//! default), one after the other, three times each. In each: dnsperf against the resolver
//! of a task on node 1 (QPS at saturation, 10 s) and wrk through a service VIP from a task
//! on node 1 to nginx tasks on nodes 2 and 3 (new connections per second, 8 s). The
//! counters in the DNS path are there in both: they are plain atomics, always on.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use swarmnet_lab::{wait_for, Lab};

use crate::bench_lb::{wrk, NGINX};

const LAB: &str = "snbench";
const T: Duration = Duration::from_secs(60);

/// GETs every URL given every second; on SIGTERM prints how many succeeded.
const SCRAPER: &str = r#"
import signal, sys, time, urllib.request
n = 0
def done(*_):
    print(n, flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    for u in sys.argv[1:]:
        try:
            urllib.request.urlopen(u, timeout=2).read(); n += 1
        except Exception:
            pass
    time.sleep(1)
"#;

/// One lab: (DNS QPS, VIP connections per second).
fn round(on: bool, n: &mut usize) -> Result<(f64, f64)> {
    if on {
        std::env::remove_var("SWARMNET_LAB_METRICS");
    } else {
        std::env::set_var("SWARMNET_LAB_METRICS", "off");
    }
    let lab = Lab::up_full(LAB, 3, 3, 5.0, &[], &["--dns-search", "."])?;
    lab.cli_ok(0, &["network", "create", "--attachable", "bench"])?;
    // Two sleepers on node 1 make it the busiest: the nginx tasks go to nodes 2 and 3.
    for i in 0..2 {
        lab.cli_ok(0, &["run", "--detach", "--name", &format!("ballast{i}"), "--network", "bench", "--", "sleep", "3600"])?;
    }
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "2", "--network", "bench", "--", "sh", "-c", NGINX])?;
    let web = lab.wait_service("web", 2, T)?;
    if web.iter().any(|t| t["node"] == format!("{LAB}-n1").as_str()) {
        bail!("a backend landed on the client's node: {web:?}");
    }
    let svc: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", "web"])?)?;
    let vip = svc["vips"]["bench"].as_str().context("vip")?.to_string();
    wait_for("nginx answering on the VIP", T, || {
        let out = lab.cli_ok(0, &["run", "--name", "probe", "--network", "bench", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{vip}/")]).ok()?;
        (out.trim() == "200").then_some(())
    })?;
    lab.cli_ok(0, &["run", "--detach", "--name", "asker", "--network", "bench", "--", "sleep", "3600"])?;
    // Its process, found by the name every task carries in its environment.
    let asker_pid = wait_for("the asker's process", T, || {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let mine = env.split(|b| *b == 0).any(|kv| kv == b"SWARMNET_TASK_NAME=asker") && env.split(|b| *b == 0).any(|kv| kv == format!("SWARMNET_LAB={LAB}").as_bytes());
            mine.then_some(pid)
        })
    })?;
    let queries = lab.nodes[0].data_dir.join("bench-queries");
    std::fs::write(&queries, "web A\ntasks.web A\n")?;
    // The scraper: every daemon's /metrics every second, one Python process in node 1's
    // namespace (as a Prometheus elsewhere would cost the nodes nothing but the answers).
    let scraper = if on {
        let targets: Vec<String> = lab.nodes.iter().map(|n| format!("http://{}:{}/metrics", n.addr, swarmnet_lab::LAB_METRICS_PORT)).collect();
        Some(
            std::process::Command::new("ip")
                .args(["netns", "exec", &lab.nodes[0].ns, "python3", "-c", SCRAPER])
                .args(&targets)
                .env("SWARMNET_LAB", LAB)
                .stdout(std::process::Stdio::piped())
                .spawn()?,
        )
    } else {
        None
    };
    let r = (|| -> Result<(f64, f64)> {
        let (qps, _, _) = crate::bench_dns::dnsperf_qps(&asker_pid.to_string(), "127.0.0.11", &queries, "1")?;
        *n += 1;
        let w = wrk(&lab, *n, &format!("http://{vip}/"))?;
        Ok((qps, w.rps))
    })();
    if let Some(s) = scraper {
        // SIGTERM: it prints how many scrapes succeeded and exits.
        let _ = std::process::Command::new("kill").args(["-TERM", &s.id().to_string()]).status();
        let out = s.wait_with_output()?;
        let scrapes: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
        if scrapes == 0 {
            bail!("metrics on, but no scrape succeeded");
        }
        println!("  (scrapes during the round: {scrapes})");
    }
    drop(lab);
    let _ = std::fs::remove_dir_all("/tmp/snbench-nginx");
    r
}

pub fn bench_metrics() -> Result<()> {
    let mut n = 0;
    let (mut dns, mut lb) = (Vec::new(), Vec::new());
    for i in 1..=3 {
        let (q_off, c_off) = round(false, &mut n)?;
        let (q_on, c_on) = round(true, &mut n)?;
        println!("round {i}: DNS {q_off:.0} qps off, {q_on:.0} qps on = {:.3}x; VIP {c_off:.0} conn/s off, {c_on:.0} conn/s on = {:.3}x", q_on / q_off, c_on / c_off);
        dns.push(q_on / q_off);
        lb.push(c_on / c_off);
    }
    std::env::remove_var("SWARMNET_LAB_METRICS");
    let worst = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("\nfigures (for docs/benchmarks.md): metrics on / off (goal >= 0.98x)");
    println!("  DNS QPS: mean {:.3}x, worst {:.3}x; VIP connections/s: mean {:.3}x, worst {:.3}x", mean(&dns), worst(&dns), mean(&lb), worst(&lb));
    Ok(())
}
