//! `cargo xtask bench lb` (release build), three parts:
//! 1. New TCP connections per second and request latency through a service VIP against
//!    straight to one task's address, same client, same run: wrk with `Connection: close`
//!    as a task on node 1; nginx tasks on nodes 2 and 3. Three back-to-back pairs.
//! 2. Programming, in this process, on a cgroup and bpffs folder of its own: 10,000
//!    services x 10 backends through the real eBPF backend; then one backend change at 10
//!    and at 10,000 services.
//! 3. The agent's RSS with 10,000 services programmed (a gossip peer publishes 10,000
//!    endpoints, each with a VIP of its own, on a network the node is on).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use swarmnet_dataplane::lb::{BackendLb, BackendState, EbpfLb, Host, LbBackend, ServiceLb};
use swarmnet_lab::{wait_for, Lab};

use crate::pct;

const LAB: &str = "snbench";
const T: Duration = Duration::from_secs(60);

/// nginx answering 200 to everything on port 80, one worker, files of its own per task.
pub(crate) const NGINX: &str = r#"d=/tmp/snbench-nginx/$SWARMNET_TASK_ID; mkdir -p $d && cat > $d/nginx.conf <<NGINXCONF
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $d; proxy_temp_path $d; fastcgi_temp_path $d; uwsgi_temp_path $d; scgi_temp_path $d;
  server { listen 80 backlog=8192; location / { return 200 "ok\n"; } }
}
NGINXCONF
exec nginx -c $d/nginx.conf -g 'daemon off;'"#;

pub(crate) struct Wrk {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

/// "1.23ms", "456.00us", "1.02s" -> milliseconds.
fn ms(s: &str) -> Option<f64> {
    let (n, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map(|i| s.split_at(i))?;
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => return None,
    })
}

pub(crate) fn parse_wrk(out: &str) -> Result<Wrk> {
    let field = |label: &str| out.lines().find_map(|l| l.trim().strip_prefix(label).map(|r| r.trim().to_string()));
    let rps: f64 = field("Requests/sec:").context("wrk printed no Requests/sec")?.parse()?;
    let p50 = field("50%").and_then(|v| ms(&v)).context("wrk printed no 50% latency")?;
    let p99 = field("99%").and_then(|v| ms(&v)).context("wrk printed no 99% latency")?;
    let socket_errors: u64 = out.lines().find(|l| l.contains("Socket errors:")).map(|l| l.split(|c: char| !c.is_ascii_digit()).filter_map(|x| x.parse::<u64>().ok()).sum()).unwrap_or(0);
    let non_2xx: u64 = field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(Wrk { rps, p50_ms: p50, p99_ms: p99, errors: socket_errors + non_2xx })
}

pub(crate) fn wrk(lab: &Lab, n: usize, url: &str) -> Result<Wrk> {
    let name = format!("wrk{n}");
    let out = lab.cli_ok(0, &["run", "--name", &name, "--network", "bench", "--", "wrk", "-t1", "-c32", "-d8s", "--latency", "-H", "Connection: close", url])?;
    parse_wrk(&out).with_context(|| format!("wrk output:\n{out}"))
}

pub fn bench_lb() -> Result<()> {
    connections("ebpf")?;
    connections("nftables")?;
    programming()?;
    agent_rss()
}

fn connections(lb: &str) -> Result<()> {
    let lab = Lab::up_full(LAB, 3, 3, 5.0, &[], &["--lb", lb])?;
    lab.cli_ok(0, &["network", "create", "--attachable", "bench"])?;
    // Two sleepers on node 1 make it the busiest, so the two nginx tasks go to nodes 2 and 3:
    // every backend is on another node than the client.
    for i in 0..2 {
        lab.cli_ok(0, &["run", "--detach", "--name", &format!("ballast{i}"), "--network", "bench", "--", "sleep", "3600"])?;
    }
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "2", "--network", "bench", "--", "sh", "-c", NGINX])?;
    let tasks = lab.wait_service("web", 2, T)?;
    // And a service of one task: VIP against straight to that same task isolates what the
    // translation costs.
    lab.cli_ok(0, &["service", "create", "--name", "solo", "--replicas", "1", "--network", "bench", "--", "sh", "-c", NGINX])?;
    let solo = lab.wait_service("solo", 1, T)?;
    if tasks.iter().chain(solo.iter()).any(|t| t["node"] == format!("{LAB}-n1").as_str()) {
        bail!("a backend landed on the client's node: {tasks:?} {solo:?}");
    }
    let vip_of = |s: &str| -> Result<String> {
        let v: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", s])?)?;
        Ok(v["vips"]["bench"].as_str().context("vip")?.to_string())
    };
    let vip = vip_of("web")?;
    let solo_vip = vip_of("solo")?;
    let direct = tasks[0]["addresses"]["bench"].as_str().context("task address")?.to_string();
    let solo_direct = solo[0]["addresses"]["bench"].as_str().context("task address")?.to_string();
    for target in [&direct, &vip, &solo_direct, &solo_vip] {
        wait_for(&format!("nginx answering on {target}"), T, || {
            let out = lab.cli_ok(0, &["run", "--name", "probe", "--network", "bench", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{target}/")]).ok()?;
            (out.trim() == "200").then_some(())
        })?;
    }
    let mut n = 0;
    for (label, direct, vip) in [("one task: VIP of its 1-task service vs the task", &solo_direct, &solo_vip), ("web: VIP over 2 tasks vs one of them", &direct, &vip)] {
        // A pair first, not counted: the first connections to a task find it cold.
        n += 1;
        wrk(&lab, n, &format!("http://{direct}/"))?;
        n += 1;
        wrk(&lab, n, &format!("http://{vip}/"))?;
        let mut worst = f64::INFINITY;
        for round in 1..=3 {
            n += 1;
            let d = wrk(&lab, n, &format!("http://{direct}/"))?;
            n += 1;
            let v = wrk(&lab, n, &format!("http://{vip}/"))?;
            let ratio = v.rps / d.rps;
            worst = worst.min(ratio);
            println!(
                "[{lb}] {label}, round {round}: direct {:.0} conn/s (p50 {:.2} ms, p99 {:.2} ms, errors {}); VIP {:.0} conn/s (p50 {:.2} ms, p99 {:.2} ms, errors {}) = {ratio:.3}x direct",
                d.rps, d.p50_ms, d.p99_ms, d.errors, v.rps, v.p50_ms, v.p99_ms, v.errors
            );
        }
        println!("[{lb}] {label}: worst VIP/direct ratio over the 3 rounds: {worst:.3}");
    }
    println!("{}", lab.cli_ok(0, &["lb", "ls"])?);
    drop(lab);
    // The nginx tasks' files.
    let _ = std::fs::remove_dir_all("/tmp/snbench-nginx");
    Ok(())
}

fn svc(i: u32, backends: u32, vni: u32) -> ServiceLb {
    let base = u32::from(Ipv4Addr::new(10, 64, 0, 0));
    ServiceLb {
        vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 32, 0, 0)) + i),
        network: "bench".into(),
        vni,
        service: format!("s{i}"),
        backends: (0..backends).map(|b| BackendLb { task: format!("t{i}.{b}"), ip: Ipv4Addr::from(base + i * 16 + b), state: BackendState::Active }).collect(),
    }
}

fn programming() -> Result<()> {
    let node = "snbench-lbprog";
    swarmnet_dataplane::lb::host::remove_leftovers(node)?;
    let bpffs = swarmnet_lab::lab_bpffs()?;
    let host = Host::prepare(node, Some(&bpffs))?;
    let dir = std::env::temp_dir().join(node);
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let ns = swarmnet_dataplane::netns::NsWorker::start()?;
    let result = rt.block_on(async {
        let lb = Arc::new(EbpfLb::open(&host, ns, &dir.join("lb.lock"))?);
        let first: Vec<ServiceLb> = (0..10).map(|i| svc(i, 10, 4096)).collect();
        ok(lb.set(&first).await)?;
        let (c10_50, c10_99) = change(&lb).await?;
        // What the sink hands over after a resync of a network with that many services.
        let rest: Vec<ServiceLb> = (10..10_000).map(|i| svc(i, 10, 4096)).collect();
        let t = Instant::now();
        ok(lb.set(&rest).await)?;
        let load = t.elapsed();
        let (c10k_50, c10k_99) = change(&lb).await?;
        let rows = lb.read().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(rows.len() == 10_000, "10,000 services programmed, {} read back", rows.len());
        println!("programming: 9,990 services x 10 backends (after the first 10, one batch) in {:.3} s ({:.1} us per service)", load.as_secs_f64(), load.as_secs_f64() * 1e6 / 9990.0);
        println!("one backend change: at 10 services p50 {c10_50:.1} us p99 {c10_99:.1} us; at 10,000 services p50 {c10k_50:.1} us p99 {c10k_99:.1} us");
        Ok::<(), anyhow::Error>(())
    });
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
    swarmnet_dataplane::lb::host::remove_leftovers(node)?;
    result
}

/// One backend of service 0 drained or made active again, 200 times: microseconds per
/// change (p50, p99).
async fn change(lb: &EbpfLb) -> Result<(f64, f64)> {
    let mut times = Vec::new();
    for k in 0..200u32 {
        let mut s = svc(0, 10, 4096);
        s.backends[(k % 10) as usize].state = if k % 2 == 0 { BackendState::Draining } else { BackendState::Active };
        let t = Instant::now();
        ok(lb.set(std::slice::from_ref(&s)).await)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((pct(&mut times, 50.0), pct(&mut times, 99.0)))
}

fn ok(results: Vec<Result<(), swarmnet_types::SinkError>>) -> Result<()> {
    for r in results {
        r.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

pub(crate) fn agent_rss() -> Result<()> {
    let lab = Lab::up(LAB, 3, 2, 5.0)?;
    let pid = lab.nodes[1].pid.context("daemon pid")?;
    lab.cli_ok(0, &["network", "create", "--subnet", "10.0.0.0/16", "big"])?;
    lab.cli_ok(0, &["service", "create", "--name", "one", "--mode", "global", "--network", "big", "--", "sleep", "3600"])?;
    lab.wait_service("one", 2, T)?;
    std::thread::sleep(Duration::from_secs(2));
    let before = crate::rss_kib(pid)?;
    let net: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "big"])?)?;
    let net_id = net["id"].as_str().context("id")?.to_string();
    let mut sim = Command::new("ip")
        .args(["netns", "exec", &lab.nodes[2].ns])
        .arg(crate::sim_binary(&lab.bin))
        .args(["endpoints", "--gossip-addr", "10.210.0.3:7946", "--seed", "10.210.0.1:7946", "--network", &net_id, "--count", "10000", "--vips", "--keys-from"])
        .arg(&lab.nodes[0].data_dir)
        .env("SWARMNET_LAB", &lab.name)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let t = Instant::now();
    let r = wait_for("10,000 VIPs in node 2's load balancer", Duration::from_secs(120), || {
        let v = lab.cli_json(1, &["lb", "ls"]).ok()?;
        (v["services"].as_array()?.len() >= 10_001).then_some(())
    });
    let took = t.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let after = crate::rss_kib(pid);
    // The daemon hands freed pages back every 5 s (ADR 0031): what it holds once settled.
    std::thread::sleep(Duration::from_secs(7));
    let settled = crate::rss_kib(pid);
    let _ = sim.kill();
    let _ = sim.wait();
    r?;
    let (after, settled) = (after?, settled?);
    let per = |kib: u64| kib.saturating_sub(before) as f64 / 10_000.0;
    println!(
        "agent (worker daemon) RSS: {:.1} MiB with 1 local task; {:.1} MiB with 10,000 services (10,000 remote endpoints with a VIP each) in its table, overlay and load balancer 3 s after they were programmed ({:.2} KiB per service), {:.1} MiB 10 s after ({:.2} KiB per service; programmed {:.1} s after the publisher started)",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        per(after),
        settled as f64 / 1024.0,
        per(settled),
        took.as_secs_f64()
    );
    Ok(())
}
