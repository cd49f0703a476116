//! `cargo xtask bench dns`, two parts on the 3-node lab:
//! 1. dnsperf inside a task's network namespace against our resolver on 127.0.0.11 and
//!    against dnsmasq serving the same names from a hosts file on 127.0.0.12 in the same
//!    namespace, same run: QPS at saturation, and latency percentiles at a fixed rate.
//! 2. Update latency: a 4th task of `web` starts on another node; a poller in a task on
//!    node 3 asks `tasks.web` every millisecond. Measured from the task's endpoint being
//!    published on its node (daemon log) and from the `service scale` call.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use crate::bench_convergence::published_at;
use crate::{p50_p99_max, pct};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use swarmnet_lab::{wait_for, Lab};

const LAB: &str = "snbench";
const T: Duration = Duration::from_secs(30);
/// Debian puts dnsmasq in /usr/sbin, which a non-login root shell may not have on PATH.
const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// Asks 127.0.0.11 for `tasks.<svc>` every millisecond; prints "<epoch seconds> <ips>"
/// whenever the set of addresses changes.
const POLLER: &str = r#"
import socket, struct, sys, time
name = sys.argv[1]
q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
s.connect(("127.0.0.11", 53))
def skip(b, i):
    while True:
        l = b[i]
        if l == 0: return i + 1
        if l >= 0xc0: return i + 2
        i += l + 1
last = None; qid = 0
while True:
    qid = (qid + 1) & 0xffff
    s.send(struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack(">HH", 1, 1))
    try:
        b = s.recv(65535)
    except socket.timeout:
        continue
    if struct.unpack(">H", b[:2])[0] != qid: continue
    an = struct.unpack(">H", b[6:8])[0]
    i = skip(b, 12) + 4
    ips = []
    for _ in range(an):
        i = skip(b, i)
        t, c, ttl, rl = struct.unpack(">HHIH", b[i:i+10]); i += 10
        if t == 1: ips.append(socket.inet_ntoa(b[i:i+4]))
        i += rl
    cur = " ".join(sorted(ips))
    if cur != last:
        print("%.6f %s" % (time.time(), cur), flush=True); last = cur
    time.sleep(0.001)
"#;

fn pid(t: &Value) -> Result<String> {
    Ok(t["pid"].as_u64().context("pid")?.to_string())
}

pub fn bench_dns(trials: usize) -> Result<()> {
    let lab = Lab::up_full(LAB, 3, 3, 5.0, &[], &["--dns-search", "."])?;
    lab.cli_ok(0, &["network", "create", "--attachable", "bench"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "3", "--network", "bench", "--", "sleep", "3600"])?;
    lab.cli_ok(0, &["service", "create", "--name", "db", "--replicas", "2", "--endpoint-mode", "dnsrr", "--network", "bench", "--", "sleep", "3600"])?;
    let web = lab.wait_service("web", 3, T)?;
    let db = lab.wait_service("db", 2, T)?;
    throughput(&lab, &web, &db)?;
    update_latency(&lab, trials)
}

fn throughput(lab: &Lab, web: &[Value], db: &[Value]) -> Result<()> {
    let asker = web.iter().find(|t| t["node"] == format!("{LAB}-n1").as_str()).context("a web task on node 1")?;
    let asker = pid(asker)?;
    let svc: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", "web"])?)?;
    let vip = svc["vips"]["bench"].as_str().context("vip")?.to_string();
    // The same names for both servers.
    let mut hosts = format!("{vip} web\n");
    let mut names = vec!["web".to_string(), "tasks.web".to_string(), "db".to_string()];
    for t in web {
        let ip = t["addresses"]["bench"].as_str().context("ip")?;
        hosts.push_str(&format!("{ip} tasks.web\n{ip} {}\n", t["name"].as_str().context("name")?));
        names.push(t["name"].as_str().context("name")?.to_string());
    }
    for t in db {
        hosts.push_str(&format!("{} db\n", t["addresses"]["bench"].as_str().context("ip")?));
    }
    let dir = lab.nodes[0].data_dir.clone();
    let hosts_file = dir.join("bench-hosts");
    std::fs::write(&hosts_file, hosts)?;
    let queries = dir.join("bench-queries");
    std::fs::write(&queries, names.iter().map(|n| format!("{n} A\n")).collect::<String>())?;
    let mut dnsmasq = Command::new("nsenter")
        .args([
            "-t",
            &asker,
            "-n",
            "--",
            DNSMASQ,
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.12",
            "--port=53",
            "--local-ttl=2",
            "--pid-file=",
            "--user=root",
            "--log-facility=/dev/null",
        ])
        .arg(format!("--addn-hosts={}", hosts_file.display()))
        .env("SWARMNET_LAB", LAB)
        .spawn()
        .context("start dnsmasq")?;
    std::thread::sleep(Duration::from_millis(500));
    let daemon: u32 = std::fs::read_to_string(dir.join("daemon.pid"))?.trim().parse()?;
    let r = (|| -> Result<()> {
        let mut last_dnsmasq = 0.0;
        let rounds = [("dnsmasq", "127.0.0.12"), ("swarmnet", "127.0.0.11")];
        // One dnsperf thread (it takes a core, the server the other), then two (everything
        // competes for both cores: the cheaper server leaves more to the client).
        for (threads, (who, addr)) in ["1"; 8].into_iter().chain(["2"; 8]).zip(rounds.iter().cycle().copied()) {
            // CPU of the server process (dnsmasq, or the whole node daemon) per answer.
            let server = if who == "dnsmasq" { dnsmasq.id() } else { daemon };
            let cpu0 = cpu_ticks(server)?;
            let (qps, lost, total) = dnsperf_qps(&asker, addr, &queries, threads)?;
            let cpu = (cpu_ticks(server)? - cpu0) as f64 / 100.0;
            let ratio = if who == "dnsmasq" {
                last_dnsmasq = qps;
                String::new()
            } else {
                format!("  = {:.2}x the dnsmasq run before it", qps / last_dnsmasq)
            };
            println!("saturation -T {threads} {who:9} {qps:>9.0} qps  lost {lost}  server CPU {:.2} us/query ({cpu:.1} s for {total} queries){ratio}", cpu * 1e6 / total as f64);
        }
        for rate in [5000, 20000] {
            for (who, addr) in [("dnsmasq", "127.0.0.12"), ("swarmnet", "127.0.0.11")] {
                let mut lat = dnsperf_latencies(&asker, addr, &queries, rate)?;
                println!("at {rate:>5} qps {who:9} n={} p50={:.3} ms p99={:.3} ms p99.9={:.3} ms", lat.len(), pct(&mut lat, 50.0), pct(&mut lat, 99.0), pct(&mut lat, 99.9));
            }
        }
        Ok(())
    })();
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    r
}

fn dnsperf(asker: &str, args: &[&str]) -> Result<String> {
    let mut a = vec!["dnsperf"];
    a.extend_from_slice(args);
    swarmnet_lab::in_netns_of(asker.parse()?, &a)
}

/// utime + stime of a process, in clock ticks (100 per second).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

/// Queries per second at saturation (10 s; 4 clients and 100 outstanding per dnsperf
/// thread), queries lost, queries completed.
pub(crate) fn dnsperf_qps(asker: &str, server: &str, queries: &std::path::Path, threads: &str) -> Result<(f64, String, u64)> {
    let q = queries.display().to_string();
    let (clients, outstanding) = if threads == "2" { ("8", "200") } else { ("4", "100") };
    let out = dnsperf(asker, &["-s", server, "-d", &q, "-l", "10", "-T", threads, "-c", clients, "-q", outstanding])?;
    let qps = out.lines().find(|l| l.contains("Queries per second:")).and_then(|l| l.split(':').nth(1)).and_then(|v| v.trim().parse().ok()).with_context(|| format!("no QPS in:\n{out}"))?;
    let lost = out.lines().find(|l| l.contains("Queries lost:")).and_then(|l| l.split(':').nth(1)).unwrap_or("?").trim().to_string();
    let total = out
        .lines()
        .find(|l| l.contains("Queries completed:"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no completed count in:\n{out}"))?;
    Ok((qps, lost, total))
}

/// Per-query latencies (ms) at a fixed rate for 5 s.
fn dnsperf_latencies(asker: &str, server: &str, queries: &std::path::Path, rate: u32) -> Result<Vec<f64>> {
    let q = queries.display().to_string();
    let r = rate.to_string();
    let out = dnsperf(asker, &["-s", server, "-d", &q, "-l", "5", "-Q", &r, "-v"])?;
    // "> NOERROR web. A 0.000081" (the last field is the latency in seconds).
    let lat: Vec<f64> = out.lines().filter(|l| l.starts_with("> ")).filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok()).map(|s| s * 1000.0).collect();
    if lat.is_empty() {
        bail!("dnsperf -v gave no per-query lines:\n{}", out.lines().take(20).collect::<Vec<_>>().join("\n"));
    }
    Ok(lat)
}

fn update_latency(lab: &Lab, trials: usize) -> Result<()> {
    // A standalone task on node 3 makes it the busiest node, so new web tasks go elsewhere.
    lab.cli_ok(2, &["run", "--detach", "--name", "filler", "--network", "bench", "--", "sleep", "3600"])?;
    let web = lab.wait_service("web", 3, T)?;
    let asker = web.iter().find(|t| t["node"] == format!("{LAB}-n3").as_str()).context("a web task on node 3")?;
    let mut poller: Child = Command::new("nsenter").args(["-t", &pid(asker)?, "-n", "--", "python3", "-c", POLLER, "tasks.web"]).env("SWARMNET_LAB", LAB).stdout(Stdio::piped()).spawn()?;
    let (tx, rx) = mpsc::channel::<(f64, String)>();
    let stdout = poller.stdout.take().context("poller stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some((t, ips)) = line.split_once(' ') {
                if let Ok(t) = t.parse() {
                    let _ = tx.send((t, ips.to_string()));
                }
            } else if let Ok(t) = line.trim().parse() {
                let _ = tx.send((t, String::new()));
            }
        }
    });
    let r = (|| -> Result<()> {
        let (mut from_publish, mut from_call) = (Vec::new(), Vec::new());
        let mut local = 0;
        let mut trial = 0;
        while from_publish.len() < trials && trial < trials * 3 {
            trial += 1;
            while rx.try_recv().is_ok() {}
            let offsets: Vec<usize> = (0..3).map(|i| lab.log(i).len()).collect();
            let t0 = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs_f64();
            lab.cli_ok(0, &["service", "scale", "--detach", "web=4"])?;
            let new = wait_for("the 4th task", T, || {
                let v = lab.cli_json(0, &["service", "ps", "web"]).ok()?;
                v.as_array()?.iter().find(|t| t["name"] == "web.4" && t["state"] == "running" && t["desired_state"] == "running").cloned()
            })?;
            let ip = new["addresses"]["bench"].as_str().context("ip")?.to_string();
            let seen = loop {
                let (t, ips) = rx.recv_timeout(T).context("the poller did not see the new task")?;
                if ips.split(' ').any(|x| x == ip) {
                    break t;
                }
            };
            let origin = lab.nodes.iter().position(|n| n.ns == new["node"].as_str().unwrap_or("")).context("node")?;
            let task_id = new["id"].as_str().context("id")?;
            let log = lab.log(origin);
            let published = published_at(&log[offsets[origin].min(log.len())..], task_id).context("publish time in the origin's log")?;
            if origin == 2 {
                local += 1;
            } else {
                from_publish.push((seen - published) * 1000.0);
                from_call.push((seen - t0) * 1000.0);
            }
            lab.cli_ok(0, &["service", "scale", "--detach", "web=3"])?;
            // Gone from the answers too before the next trial.
            loop {
                let (_, ips) = rx.recv_timeout(T).context("the poller did not see the task leave")?;
                if !ips.split(' ').any(|x| x == ip) {
                    break;
                }
            }
            wait_for("back to 3", T, || (lab.cli_json(0, &["service", "ps", "web"]).ok()?.as_array()?.len() == 3).then_some(()))?;
        }
        let n = from_publish.len();
        println!("published on node 1/2 -> tasks.web on node 3 lists it: trials={n} (skipped {local} placed on node 3) {}", p50_p99_max(&mut from_publish));
        println!("service scale call -> tasks.web on node 3 lists it: {}", p50_p99_max(&mut from_call));
        Ok(())
    })();
    let _ = poller.kill();
    let _ = poller.wait();
    r
}
