//! `cargo xtask bench cni`: the CNI plugin (issue 22) through the reference libcni (the lab
//! tests' driver), against the reference `bridge` + `host-local` plugins driven the same way
//! in the same run:
//! - ADD and DEL, one at a time: p50/p99 of the whole runtime call (libcni, the plugin, the
//!   daemon, the manager's IPAM);
//! - ADD → reachable from another node: a container of node 2 connects to the new one
//!   until it answers;
//! - 100 ADDs in parallel on one node: the wall time and each call's p50/p99;
//! - single-stream TCP (iperf3), container → task across nodes vs task → task.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use swarmnet_lab::{in_ns, wait_for, Lab};

const LAB: &str = "snbcni";

fn driver() -> Result<PathBuf> {
    let root = std::env::current_dir()?;
    let out = root.join("target").join("cnidriver");
    let o = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(root.join("tests/cni/driver.go"))
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", root.join("target").join("gocache"))
        .output()
        .context("go (bash .ci/setup installs golang-go and golang-github-appc-cni-dev)")?;
    if !o.status.success() {
        bail!("building the libcni driver failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(out)
}

struct Cni {
    driver: PathBuf,
    dir: PathBuf,
}

impl Cni {
    fn call(&self, node_ns: &str, verb: &str, conf: &Path, netns: &str, id: &str) -> Result<Output> {
        Ok(Command::new("ip")
            .args(["netns", "exec", node_ns])
            .arg(&self.driver)
            .args([verb, &conf.display().to_string(), netns, id, "eth0"])
            .env("CNI_PATH", format!("{}:/usr/lib/cni", self.dir.join("bin").display()))
            .env("CNI_CACHE_DIR", self.dir.join("cache"))
            .output()?)
    }

    /// One call, timed; fails on a plugin error.
    fn timed(&self, node_ns: &str, verb: &str, conf: &Path, netns: &str, id: &str) -> Result<(Duration, String)> {
        let t = Instant::now();
        let o = self.call(node_ns, verb, conf, netns, id)?;
        let d = t.elapsed();
        if !o.status.success() {
            bail!("cni {verb} {id}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok((d, String::from_utf8_lossy(&o.stdout).into_owned()))
    }
}

fn netns(name: &str) -> Result<String> {
    let _ = Command::new("ip").args(["netns", "del", name]).output();
    let o = Command::new("ip").args(["netns", "add", name]).output()?;
    if !o.status.success() {
        bail!("ip netns add {name}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(format!("/run/netns/{name}"))
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

fn address(result: &str) -> Result<String> {
    let v: Value = serde_json::from_str(result)?;
    Ok(v["ips"][0]["address"].as_str().context("no address in the result")?.split('/').next().unwrap_or_default().to_string())
}

fn iperf(prefix: &[&str], server: &str, secs: u32) -> Result<f64> {
    let t = secs.to_string();
    let mut a: Vec<&str> = prefix.to_vec();
    a.extend(["iperf3", "-c", server, "-p", "5201", "-t", &t, "-J"]);
    let o = Command::new(a[0]).args(&a[1..]).output()?;
    if !o.status.success() {
        bail!("iperf3 to {server}: {}", String::from_utf8_lossy(&o.stdout));
    }
    let v: Value = serde_json::from_slice(&o.stdout)?;
    Ok(v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")? / 1e9)
}

/// A listener on port 7000 in namespace `ns` (before its interface exists: it answers as
/// soon as the network reaches it).
fn listener(ns: &str) -> Result<Child> {
    let code = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',7000))\ns.listen(64)\nwhile True:\n c,_=s.accept()\n c.close()\n";
    Ok(Command::new("ip").args(["netns", "exec", ns, "python3", "-c", code]).stdout(Stdio::null()).spawn()?)
}

pub fn bench_cni(runs: usize) -> Result<()> {
    let lab = Lab::up(LAB, 2, 2, 1.0)?;
    lab.cli_ok(0, &["network", "create", "--attachable", "perf"])?;
    lab.cli_ok(0, &["service", "create", "--name", "iperf", "--replicas", "2", "--network", "perf", "--", "iperf3", "-s", "-p", "5201"])?;
    let tasks = lab.wait_service("iperf", 2, Duration::from_secs(30))?;
    let dir = PathBuf::from(format!("/run/swarmnet-lab/{LAB}/cni"));
    std::fs::create_dir_all(&dir)?;
    lab.cli_ok(0, &["cni", "install", "--bin-dir", &dir.join("bin").display().to_string(), "--conf-dir", &dir.join("net.d").display().to_string()])?;
    let cni = Cni { driver: driver()?, dir: dir.clone() };
    let n1 = lab.nodes[0].ns.clone();
    let n2 = lab.nodes[1].ns.clone();
    let conf_for = |i: usize| -> Result<PathBuf> {
        let list = json!({ "cniVersion": "1.0.0", "name": "perf", "plugins": [{ "type": "swarmnet", "network": "perf", "socket": lab.nodes[i].data_dir.join("control.sock") }] });
        let p = dir.join(format!("perf-n{i}.conflist"));
        std::fs::write(&p, serde_json::to_vec(&list)?)?;
        Ok(p)
    };
    let (c1, c2) = (conf_for(0)?, conf_for(1)?);
    // The baseline: the reference bridge with host-local IPAM, in node 1's namespace.
    let bridge = dir.join("bridge.conflist");
    std::fs::write(
        &bridge,
        serde_json::to_vec(
            &json!({ "cniVersion": "1.0.0", "name": "snbr", "plugins": [{ "type": "bridge", "bridge": "snbcnibr0", "isGateway": true, "ipam": { "type": "host-local", "subnet": "10.98.0.0/16", "dataDir": dir.join("ipam").display().to_string() } }] }),
        )?,
    )?;

    // ADD and DEL one at a time.
    let (mut add, mut del, mut badd, mut bdel) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for k in 0..runs {
        let p = netns(&format!("{LAB}-s{k}"))?;
        add.push(cni.timed(&n1, "add", &c1, &p, &format!("s{k}"))?.0);
        del.push(cni.timed(&n1, "del", &c1, &p, &format!("s{k}"))?.0);
        badd.push(cni.timed(&n1, "add", &bridge, &p, &format!("b{k}"))?.0);
        bdel.push(cni.timed(&n1, "del", &bridge, &p, &format!("b{k}"))?.0);
        let _ = Command::new("ip").args(["netns", "del", &format!("{LAB}-s{k}")]).output();
    }
    println!(
        "ADD one at a time ({runs}): swarmnet p50 {:.1} ms p99 {:.1} ms; bridge+host-local p50 {:.1} ms p99 {:.1} ms",
        pct(&mut add, 0.5),
        pct(&mut add, 0.99),
        pct(&mut badd, 0.5),
        pct(&mut badd, 0.99)
    );
    println!(
        "DEL one at a time ({runs}): swarmnet p50 {:.1} ms p99 {:.1} ms; bridge+host-local p50 {:.1} ms p99 {:.1} ms",
        pct(&mut del, 0.5),
        pct(&mut del, 0.99),
        pct(&mut bdel, 0.5),
        pct(&mut bdel, 0.99)
    );

    // ADD → reachable from a container of node 2.
    let probe_ns = format!("{LAB}-probe");
    let pp = netns(&probe_ns)?;
    cni.timed(&n2, "add", &c2, &pp, "probe")?;
    let mut reach = Vec::new();
    for k in 0..runs {
        let ns = format!("{LAB}-r{k}");
        let p = netns(&ns)?;
        let mut l = listener(&ns)?;
        wait_for("the listener", Duration::from_secs(10), || in_ns(&ns, &["ss", "-Htln", "sport = :7000"]).ok().filter(|o| !o.trim().is_empty()))?;
        // The probe is started first (python's start is no part of the figure): it reads the
        // address once ADD has given it, then connects until the container answers, and
        // prints the wall clock of its success.
        let code = "import socket,sys,time\nip=sys.stdin.readline().strip()\nwhile True:\n try:\n  socket.create_connection((ip,7000),timeout=0.02).close(); break\n except OSError: time.sleep(0.0005)\nprint(time.time())\n";
        let mut probe = Command::new("ip").args(["netns", "exec", &probe_ns, "timeout", "10", "python3", "-c", code]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        std::thread::sleep(Duration::from_millis(100));
        let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
        let (_, out) = cni.timed(&n1, "add", &c1, &p, &format!("r{k}"))?;
        let ip = address(&out)?;
        probe.stdin.take().context("the probe's stdin")?.write_all(format!("{ip}\n").as_bytes())?;
        let o = probe.wait_with_output()?;
        let done: f64 = String::from_utf8_lossy(&o.stdout).trim().parse().with_context(|| format!("container r{k} ({ip}) was not reachable from node 2 within 10 s"))?;
        reach.push(Duration::from_secs_f64((done - start).max(0.0)));
        cni.timed(&n1, "del", &c1, &p, &format!("r{k}"))?;
        let _ = l.kill();
        let _ = l.wait();
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    }
    println!("ADD start → reachable from node 2 ({runs}; the probe started before): p50 {:.1} ms p99 {:.1} ms", pct(&mut reach, 0.5), pct(&mut reach, 0.99));

    // 100 ADDs in parallel on node 1, then 100 DELs; the same with the bridge.
    let spaces: Vec<String> = (0..100).map(|k| netns(&format!("{LAB}-p{k}"))).collect::<Result<_>>()?;
    let parallel = |verb: &str, conf: &Path, tag: &str| -> Result<(Duration, Vec<Duration>)> {
        let t = Instant::now();
        let each: Vec<Result<Duration>> = std::thread::scope(|s| {
            let hs: Vec<_> = spaces
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    s.spawn({
                        let cni = &cni;
                        let n1 = &n1;
                        move || cni.timed(n1, verb, conf, p, &format!("{tag}{k}")).map(|r| r.0)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))).collect()
        });
        Ok((t.elapsed(), each.into_iter().collect::<Result<Vec<_>>>()?))
    };
    let (wall, mut each) = parallel("add", &c1, "p")?;
    let (dwall, mut deach) = parallel("del", &c1, "p")?;
    let (bwall, mut beach) = parallel("add", &bridge, "q")?;
    let (bdwall, _) = parallel("del", &bridge, "q")?;
    println!(
        "100 ADDs in parallel on one node: swarmnet all in {:.2} s (each p50 {:.0} ms p99 {:.0} ms), DELs in {:.2} s (p99 {:.0} ms); bridge+host-local all in {:.2} s (each p50 {:.0} ms p99 {:.0} ms), DELs in {:.2} s",
        wall.as_secs_f64(),
        pct(&mut each, 0.5),
        pct(&mut each, 0.99),
        dwall.as_secs_f64(),
        pct(&mut deach, 0.99),
        bwall.as_secs_f64(),
        pct(&mut beach, 0.5),
        pct(&mut beach, 0.99),
        bdwall.as_secs_f64()
    );
    for k in 0..100 {
        let _ = Command::new("ip").args(["netns", "del", &format!("{LAB}-p{k}")]).output();
    }

    // Throughput: a container of node 1 → the task on node 2, and node 1's task → the same.
    let on = |n: &str| tasks.iter().find(|t| t["node"] == n).cloned().context("task placement");
    let client = on(&format!("{LAB}-n1"))?;
    let srv = on(&format!("{LAB}-n2"))?;
    let pid = client["pid"].as_u64().context("pid")?.to_string();
    let srv_ip = srv["addresses"]["perf"].as_str().context("ip")?.to_string();
    let cns = format!("{LAB}-tp");
    let cp = netns(&cns)?;
    cni.timed(&n1, "add", &c1, &cp, "tp")?;
    let task_prefix = ["nsenter", "-t", pid.as_str(), "-n", "--"];
    let ctr_prefix = ["ip", "netns", "exec", cns.as_str()];
    wait_for("iperf3 from the task", Duration::from_secs(30), || iperf(&task_prefix, &srv_ip, 1).ok())?;
    wait_for("iperf3 from the container", Duration::from_secs(30), || iperf(&ctr_prefix, &srv_ip, 1).ok())?;
    let (mut t, mut c) = (Vec::new(), Vec::new());
    for r in 0..3 {
        t.push(iperf(&task_prefix, &srv_ip, 8)?);
        c.push(iperf(&ctr_prefix, &srv_ip, 8)?);
        println!("round {}: task → task {:.2} Gbit/s, container → task {:.2} Gbit/s", r + 1, t[r], c[r]);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    c.sort_by(|a, b| a.total_cmp(b));
    println!("median of 3 x 8 s: task → task {:.2} Gbit/s, container → task {:.2} Gbit/s ({:.3}×)", t[1], c[1], c[1] / t[1]);
    Ok(())
}
