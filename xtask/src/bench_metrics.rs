//! `cargo xtask bench metrics` (release build): what `--metrics-addr` costs (issue 21). The
//! flag adds a listener and the work of each scrape; the counters it reads are plain atomics,
//! always there, flag or not. So, in one 3-node lab (alternating, four pairs, so that the
//! lab's own variance — where tasks land, caches — is the same on both sides): every daemon
//! not scraped, then scraped every second by a client in node 1's namespace (more often than
//! Prometheus's 15 s default). In each: dnsperf against the resolver of a task on node 1
//! (QPS at saturation, 10 s) and wrk through a service VIP from a task on node 1 to nginx
//! tasks on nodes 2 and 3 (new connections per second, 8 s). Then the CPU one scrape costs
//! the daemon of node 1 (100 scrapes back to back, its utime + stime).

use std::process::{Command, Stdio};
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

pub fn bench_metrics() -> Result<()> {
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
    let targets: Vec<String> = lab.nodes.iter().map(|n| format!("http://{}:{}/metrics", n.addr, swarmnet_lab::LAB_METRICS_PORT)).collect();
    let mut n = 0;
    let (mut dns, mut lb) = (Vec::new(), Vec::new());
    for pair in 1..=4 {
        let mut r = [(0.0, 0.0); 2];
        for (k, scraped) in [false, true].into_iter().enumerate() {
            // The scraper: one Python process in node 1's namespace, every daemon's /metrics
            // every second.
            let scraper = if scraped {
                Some(Command::new("ip").args(["netns", "exec", &lab.nodes[0].ns, "python3", "-c", SCRAPER]).args(&targets).env("SWARMNET_LAB", LAB).stdout(Stdio::piped()).spawn()?)
            } else {
                None
            };
            let measured = (|| -> Result<(f64, f64)> {
                let (qps, _, _) = crate::bench_dns::dnsperf_qps(&asker_pid.to_string(), "127.0.0.11", &queries, "1")?;
                n += 1;
                let w = wrk(&lab, n, &format!("http://{vip}/"))?;
                Ok((qps, w.rps))
            })();
            if let Some(s) = scraper {
                // SIGTERM: it prints how many scrapes succeeded and exits.
                let _ = Command::new("kill").args(["-TERM", &s.id().to_string()]).status();
                let out = s.wait_with_output()?;
                let scrapes: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
                if scrapes == 0 {
                    bail!("scraped, but no scrape succeeded");
                }
            }
            r[k] = measured?;
        }
        let ((q_off, c_off), (q_on, c_on)) = (r[0], r[1]);
        println!("pair {pair}: DNS {q_off:.0} qps not scraped, {q_on:.0} qps scraped = {:.3}x; VIP {c_off:.0} conn/s, {c_on:.0} conn/s = {:.3}x", q_on / q_off, c_on / c_off);
        dns.push(q_on / q_off);
        lb.push(c_on / c_off);
    }
    // What one scrape costs node 1's daemon.
    let pid = lab.daemon_pid(0).context("node 1's daemon")?;
    let ticks = || -> Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let f: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
    };
    let t0 = ticks()?;
    let started = std::time::Instant::now();
    for _ in 0..100 {
        swarmnet_lab::in_ns(&lab.nodes[0].ns, &["curl", "-sf", "-o", "/dev/null", &targets[0]])?;
    }
    let wall = started.elapsed();
    let cpu_ms = (ticks()? - t0) as f64 * 10.0 / 100.0;
    let worst = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("\nfigures (for docs/benchmarks.md): scraped every second / not scraped, same lab, 4 pairs (goal >= 0.98x)");
    println!("  DNS QPS: mean {:.3}x, worst {:.3}x; VIP connections/s: mean {:.3}x, worst {:.3}x", mean(&dns), worst(&dns), mean(&lb), worst(&lb));
    println!("  one scrape of the manager's daemon: {cpu_ms:.2} ms of CPU ({:.1} ms wall each, 100 in a row)", wall.as_secs_f64() * 10.0);
    drop(lab);
    let _ = std::fs::remove_dir_all("/tmp/snbench-nginx");
    Ok(())
}
