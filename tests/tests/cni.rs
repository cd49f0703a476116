//! The CNI plugin (issue 22), driven by the reference `libcni` (a small Go program,
//! `tests/cni/driver.go`, built against Debian's golang-github-appc-cni-dev) chained with
//! the reference `portmap` and `tuning` plugins, into namespaces made as a runtime makes
//! them (`ip netns add`) on the lab's nodes. Checked with real clients from inside the
//! containers (`ip netns exec`: processes in no cgroup of swarmnet's) and from tasks.
//! Needs root, go, the reference plugins (bash .ci/setup installs them), python3 and dig.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use swarmnet_lab::{in_ns, tempdir, wait_for, Lab, TempDir};

const T: Duration = Duration::from_secs(30);
const PORT: &str = "7000";
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name).display().to_string()
}

/// The libcni driver, built once per test binary into the target's temp dir.
fn driver() -> Result<PathBuf> {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cnidriver");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cni").join("driver.go");
    let o = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gocache"))
        .output()
        .context("go (bash .ci/setup installs golang-go and golang-github-appc-cni-dev)")?;
    if !o.status.success() {
        bail!("building the libcni driver failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    if !Path::new(REFERENCE_PLUGINS).join("portmap").exists() {
        bail!("the reference CNI plugins are missing from {REFERENCE_PLUGINS} (bash .ci/setup installs containernetworking-plugins)");
    }
    Ok(out)
}

/// Where a CNI call goes: node, conflist, the container's namespace, its id.
#[derive(Clone, Copy)]
struct At<'a>(usize, &'a Path, &'a str, &'a str);

/// A runtime on the lab: the driver, a plugin folder with `swarmnet` installed by
/// `swarmnet cni install`, a cache folder.
struct Runtime {
    driver: PathBuf,
    dir: TempDir,
}

impl Runtime {
    fn new(lab: &Lab) -> Result<Runtime> {
        let driver = driver()?;
        let dir = tempdir(&format!("{}-cni", lab.name))?;
        let bin = dir.join("bin");
        let conf = dir.join("net.d");
        let out = lab.cli_ok(0, &["cni", "install", "--bin-dir", &bin.display().to_string(), "--conf-dir", &conf.display().to_string()])?;
        assert!(out.contains("swarmnet"), "install lists what it wrote: {out}");
        let written: Value = serde_json::from_str(&std::fs::read_to_string(conf.join("10-swarmnet-appnet.conflist"))?)?;
        assert_eq!(written["plugins"][0]["type"], "swarmnet");
        assert_eq!(written["plugins"][0]["network"], "appnet");
        assert!(!conf.join("10-swarmnet-backend.conflist").exists(), "a network that is not attachable gets no conf");
        Ok(Runtime { driver, dir })
    }

    /// The conflist `[swarmnet, portmap, tuning]` for network `net`, asking node `i`'s daemon.
    fn conflist(&self, lab: &Lab, i: usize, net: &str) -> Result<PathBuf> {
        self.conflist_with(lab, i, net, false)
    }

    /// The same, with the reference `bandwidth` after them if `bandwidth` (its rates given
    /// by the runtime: the `bandwidth` capability).
    fn conflist_with(&self, lab: &Lab, i: usize, net: &str, bandwidth: bool) -> Result<PathBuf> {
        let mut plugins = vec![
            json!({ "type": "swarmnet", "network": net, "socket": lab.nodes[i].data_dir.join("control.sock") }),
            json!({ "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }),
            json!({ "type": "tuning", "sysctl": { "net.core.somaxconn": "512" } }),
        ];
        if bandwidth {
            plugins.push(json!({ "type": "bandwidth", "capabilities": { "bandwidth": true } }));
        }
        let list = json!({ "cniVersion": "1.0.0", "name": net, "plugins": plugins });
        let p = self.dir.join(format!("{net}-n{i}{}.conflist", if bandwidth { "-bw" } else { "" }));
        std::fs::write(&p, serde_json::to_vec_pretty(&list)?)?;
        Ok(p)
    }

    /// The driver on node `i` (a runtime runs there, and portmap writes its rules there).
    fn run(&self, lab: &Lab, verb: &str, at: &At, caps: Option<&Value>) -> Result<Output> {
        let At(i, conf, netns, id) = *at;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &lab.nodes[i].ns]).arg(&self.driver).arg(verb).arg(conf).arg(netns).arg(id).arg("eth0");
        if let Some(caps) = caps {
            c.arg(caps.to_string());
        }
        let path = format!("{}:{REFERENCE_PLUGINS}", self.dir.join("bin").display());
        Ok(c.env("CNI_PATH", path).env("CNI_CACHE_DIR", self.dir.join(format!("cache-n{i}"))).env("CNI_ARGS_EXTRA", format!("IgnoreUnknown=1;K8S_POD_NAME={id}")).output()?)
    }

    fn ok(&self, lab: &Lab, verb: &str, at: &At, caps: Option<&Value>) -> Result<String> {
        let (i, id) = (at.0, at.3);
        let o = self.run(lab, verb, at, caps)?;
        if !o.status.success() {
            bail!("cni {verb} {id} on node {}: {}{}", i + 1, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// The CNI error code of a failed call (the driver prints `code=N msg=…` first).
    fn code(&self, lab: &Lab, verb: &str, at: &At) -> Result<(u64, String)> {
        let (i, id) = (at.0, at.3);
        let o = self.run(lab, verb, at, None)?;
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        if o.status.success() {
            bail!("cni {verb} {id} on node {} succeeded; expected a failure", i + 1);
        }
        let code =
            err.lines().next().and_then(|l| l.strip_prefix("code=")).and_then(|l| l.split_whitespace().next()).and_then(|c| c.parse().ok()).with_context(|| format!("no CNI error code: {err}"))?;
        Ok((code, err))
    }
}

/// A container's namespace, made as a runtime makes one (lab-prefixed: the lab's clean-up
/// removes it after a crash).
fn container_ns(lab: &Lab, name: &str) -> Result<(String, String)> {
    let ns = format!("{}-{name}", lab.name);
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    let o = Command::new("ip").args(["netns", "add", &ns]).output()?;
    if !o.status.success() {
        bail!("ip netns add {ns}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok((ns.clone(), format!("/run/netns/{ns}")))
}

/// A TCP server in namespace `ns` on PORT that answers `name` on every connection (what a
/// container runs). Killed with the lab's processes (its environment has the lab's marker).
fn serve_in(lab: &Lab, ns: &str, name: &str) -> Result<std::process::Child> {
    let code = format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',{PORT}))\ns.listen(64)\nwhile True:\n c,_=s.accept()\n c.sendall(b'{name}\\n')\n c.close()\n"
    );
    let child = Command::new("ip").args(["netns", "exec", ns, "python3", "-c", &code]).env("SWARMNET_LAB", &lab.name).stdout(Stdio::null()).spawn()?;
    wait_for(&format!("the server in {ns}"), T, || in_ns(ns, &["ss", "-Htln", &format!("sport = :{PORT}")]).ok().filter(|o| !o.trim().is_empty()))?;
    Ok(child)
}

/// What a TCP connection to `addr:port` from namespace `ns` reads first.
fn first_line(ns: &str, addr: &str, port: &str) -> Result<String> {
    let code = format!("import socket\ns=socket.create_connection(('{addr}',{port}),timeout=5)\nprint(s.recv(200).decode().split()[0])");
    Ok(in_ns(ns, &["python3", "-c", &code])?.trim().to_string())
}

fn vip(lab: &Lab) -> Result<String> {
    let v: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", "web"])?)?;
    v["vips"]["appnet"].as_str().map(str::to_string).with_context(|| format!("no VIP: {v}"))
}

/// A lab of 2 nodes whose load balancer is `lb`, attachable `appnet`, `web` (2 tasks of the test server) on it, and
/// `backend`, a network that is not attachable.
fn lab(name: &str, lb: &str) -> Result<Lab> {
    let lab = Lab::up_full(name, 2, 2, 1.0, &[], &["--lb", lb])?;
    assert_eq!(lab.cli_json(0, &["lb", "ls"])?["backend"], lb, "the load balancer asked for");
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    lab.cli_ok(0, &["network", "create", "backend"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "2", "--network", "appnet", "--", "python3", &script("lb_server.py"), PORT])?;
    lab.wait_service("web", 2, T)?;
    Ok(lab)
}

/// What a task on node `i` reads from `target`:PORT (a name: the task's DNS resolves it).
fn from_task(lab: &Lab, i: usize, probe: &str, target: &str) -> Result<String> {
    let code = format!("import socket\ns=socket.create_connection(('{target}',{PORT}),timeout=5)\nprint(s.recv(200).decode().split()[0])");
    Ok(lab.cli_ok(i, &["run", "--name", probe, "--network", "appnet", "--", "python3", "-c", &code])?.trim().to_string())
}

/// ADD, CHECK and DEL through libcni with `[swarmnet, portmap, tuning, bandwidth]` on two
/// nodes: the
/// container gets its address, routes, DNS and MTU; from inside it, `web` resolves to the
/// VIP and a connection to it reaches a task (the load balancer acts for a process in no
/// cgroup of swarmnet's); a task reaches the container by its name on another node; the
/// host port portmap made answers; DEL takes it off every node.
#[test]
fn libcni_attaches_containers_to_the_overlay_dns_vips_and_host_ports_ebpf() -> Result<()> {
    libcni_attaches(&lab("snx-cni-e", "ebpf")?)
}

/// The same with the nftables load balancer (a table in the container's namespace).
#[test]
fn libcni_attaches_containers_to_the_overlay_dns_vips_and_host_ports_nftables() -> Result<()> {
    libcni_attaches(&lab("snx-cni-n", "nftables")?)
}

fn libcni_attaches(lab: &Lab) -> Result<()> {
    let rt = Runtime::new(lab)?;
    let vip = vip(lab)?;
    // Rates high enough not to slow the checks below; bursts in bits.
    let shaped = json!({ "ingressRate": 400_000_000u64, "ingressBurst": 4_000_000u64, "egressRate": 300_000_000u64, "egressBurst": 4_000_000u64 });
    let caps = json!({ "portMappings": [{ "hostPort": 8080, "containerPort": 7000, "protocol": "tcp" }], "bandwidth": shaped });
    let mut containers = Vec::new();
    for (i, name) in [(0, "c1"), (1, "c2")] {
        let (ns, path) = container_ns(lab, name)?;
        let conf = rt.conflist_with(lab, i, "appnet", true)?;
        let out = rt.ok(lab, "add", &At(i, &conf, &path, name), Some(&caps))?;
        let r: Value = serde_json::from_str(&out).with_context(|| format!("the ADD result: {out}"))?;
        assert_eq!(r["cniVersion"], "1.0.0", "{r}");
        assert_eq!(r["dns"]["nameservers"], json!(["127.0.0.11"]), "{r}");
        let ip = r["ips"][0]["address"].as_str().context("an address")?.to_string();
        let idx = r["ips"][0]["interface"].as_u64().context("its interface")? as usize;
        assert_eq!(r["interfaces"][idx]["name"], "eth0", "{r}");
        assert_eq!(r["interfaces"][idx]["sandbox"], path.as_str(), "{r}");
        assert!(r["routes"].as_array().is_some_and(|rs| rs.iter().any(|x| x["dst"] == "0.0.0.0/0")), "{r}");
        // bandwidth found eth0's host interface on the node (a port of the network's
        // node-side bridge) and shaped it: a qdisc on it (to the container), and its ifb
        // (listed in the result) shaping what the container sends.
        let node_ns = &lab.nodes[i].ns;
        let host_if = r["interfaces"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["sandbox"].is_null() && x["name"].as_str().is_some_and(|n| n.starts_with("snt"))))
            .and_then(|x| x["name"].as_str())
            .context("eth0's host interface in the result")?
            .to_string();
        let port = in_ns(node_ns, &["ip", "-o", "link", "show", "dev", &host_if])?;
        assert!(port.contains("master sncb"), "{host_if} is a port of the node-side bridge: {port}");
        let qdisc = in_ns(node_ns, &["tc", "qdisc", "show", "dev", &host_if])?;
        assert!(qdisc.contains("tbf") || qdisc.contains("htb"), "bandwidth shaped {host_if}: {qdisc}");
        let ifb = r["interfaces"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["name"].as_str().is_some_and(|n| n.starts_with("bwp"))))
            .and_then(|x| x["name"].as_str())
            .context("bandwidth's ifb in the result")?
            .to_string();
        let ifb_qdisc = in_ns(node_ns, &["tc", "qdisc", "show", "dev", &ifb])?;
        assert!(ifb_qdisc.contains("tbf") || ifb_qdisc.contains("htb"), "the container's egress is shaped on {ifb}: {ifb_qdisc}");
        // In the namespace: the address, the MTU of the overlay, tuning's sysctl after ours.
        let addr = in_ns(&ns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
        assert!(addr.contains(&ip), "{addr}");
        assert!(in_ns(&ns, &["ip", "-o", "link", "show", "dev", "eth0"])?.contains("mtu 1450"));
        assert_eq!(in_ns(&ns, &["cat", "/proc/sys/net/core/somaxconn"])?.trim(), "512", "tuning ran after swarmnet");
        containers.push((i, name, ns, path, conf, ip.split('/').next().unwrap_or_default().to_string()));
    }
    let (_, _, ns1, _, _, _) = &containers[0];
    let (_, _, ns2, _, _, ip2) = &containers[1];

    // From the container: the service's name gives its VIP, a connection to it reaches a
    // task; a task's name resolves too.
    let answer = in_ns(ns1, &["dig", "+short", "+time=2", "+tries=2", "@127.0.0.11", "web"])?;
    assert_eq!(answer.trim(), vip, "dig web from the container");
    let mut reached = std::collections::BTreeSet::new();
    for _ in 0..6 {
        reached.insert(first_line(ns1, &vip, PORT)?);
    }
    assert_eq!(reached.into_iter().collect::<Vec<_>>(), vec!["web.1".to_string(), "web.2".to_string()], "round robin over both tasks from the container");

    // A task reaches the container on the other node by its name.
    let _server = serve_in(lab, ns2, "c2")?;
    assert_eq!(from_task(lab, 0, "probe1", "c2")?, "c2");
    let dig = lab.cli_ok(0, &["run", "--name", "probe2", "--network", "appnet", "--", "dig", "+short", "c2"])?;
    assert_eq!(dig.trim(), ip2.as_str(), "the container's name resolves to its address");

    // portmap's host port on node 2 answers from outside.
    let cl = lab.outside_client()?;
    assert_eq!(first_line(&cl, &lab.nodes[1].addr, "8080")?, "c2", "the host port 8080 of node 2");

    // Egress: a container reaches a server outside the cluster (on the underlay, not an
    // overlay), masqueraded to its node's address, as Docker's gwbridge does.
    let code = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',7100))\ns.listen(8)\nwhile True:\n c,a=s.accept()\n c.sendall((a[0]+'\\n').encode())\n c.close()\n";
    let mut outside = Command::new("ip").args(["netns", "exec", &cl, "python3", "-c", code]).env("SWARMNET_LAB", &lab.name).stdout(Stdio::null()).spawn()?;
    wait_for("the server outside the cluster", T, || in_ns(&cl, &["ss", "-Htln", "sport = :7100"]).ok().filter(|o| !o.trim().is_empty()))?;
    let seen = first_line(ns1, &format!("{}.250", swarmnet_lab::UNDERLAY_PREFIX), "7100");
    let _ = outside.kill();
    let _ = outside.wait();
    assert_eq!(seen?, lab.nodes[0].addr, "the container's connection outside the cluster comes from its node's address");

    // CHECK (without the port mappings: portmap 1.1.1's own CHECK of them is broken,
    // containernetworking/plugins#819), then drift.
    let check_caps = json!({ "bandwidth": shaped });
    for (i, name, _, path, conf, _) in &containers {
        rt.ok(lab, "check", &At(*i, conf, path, name), Some(&check_caps))?;
    }
    let (i, name, ns, path, conf, ip) = &containers[0];
    in_ns(ns, &["ip", "addr", "del", &format!("{ip}/24"), "dev", "eth0"])?;
    let (code, err) = rt.code(lab, "check", &At(*i, conf, path, name))?;
    assert_eq!(code, 101, "drift: {err}");
    assert!(err.contains(&format!("address {ip}/24 is missing")), "{err}");

    // DEL (twice): off every node. DEL answers once the container is off the network and
    // its links are down and out of the way (renamed: `eth0` is free at once); they are
    // deleted right after.
    for (i, name, ns, path, conf, _) in &containers {
        rt.ok(lab, "del", &At(*i, conf, path, name), Some(&caps))?;
        let links = in_ns(ns, &["ip", "-o", "link"])?;
        assert!(!links.contains("eth0") && !links.contains("swarmnet0"), "the container's interface names are free when DEL answers: {links}");
        let routes = in_ns(ns, &["ip", "route"])?;
        assert!(routes.trim().is_empty(), "no route of ours is left when DEL answers: {routes}");
        rt.ok(lab, "del", &At(*i, conf, path, name), Some(&caps))?;
        wait_for("the container's links deleted", T, || (in_ns(ns, &["ip", "-o", "link"]).ok()?.lines().count() == 1).then_some(()))?;
    }
    let mut k = 0;
    wait_for("c2 leaving the cluster's DNS", T, || {
        k += 1;
        let dig = lab.cli_ok(0, &["run", "--name", &format!("probe-gone{k}"), "--network", "appnet", "--", "dig", "+short", "c2"]).ok()?;
        dig.trim().is_empty().then_some(())
    })?;
    for n in 0..2 {
        let neigh = in_ns(&format!("{}-n{}", lab.name, n + 1), &["ip", "neigh"]).unwrap_or_default();
        assert!(!neigh.contains(&format!("{ip2} ")), "node {}: {neigh}", n + 1);
    }
    wait_for("the manager freeing c1's and c2's addresses", T, || {
        let net: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "appnet"]).ok()?).ok()?;
        (!net["endpoints"].as_array()?.iter().any(|e| e["name"] == "c1" || e["name"] == "c2")).then_some(())
    })?;
    let refused = Command::new("ip").args(["netns", "exec", &cl, "python3", "-c", &format!("import socket\nsocket.create_connection(('{}',8080),timeout=3)", lab.nodes[1].addr)]).output()?;
    assert!(!refused.status.success(), "portmap's host port is gone after DEL");
    Ok(())
}

/// Bad input and faults: an unknown network, one that is not attachable, no or bad stdin,
/// a namespace that does not exist, ADD twice, the agent down during ADD (try again later)
/// and DEL (it succeeds once the agent is back), an agent restart (the container keeps its
/// network and is adopted), a container whose namespace goes without DEL (cleaned up), and
/// 100 ADDs at once on one node.
#[test]
fn bad_input_faults_restarts_and_a_hundred_adds_at_once() -> Result<()> {
    let mut lab = lab("snx-cnif", "ebpf")?;
    let rt = Runtime::new(&lab)?;
    let (ns, path) = container_ns(&lab, "c1")?;
    let bad = rt.conflist(&lab, 0, "nosuchnet")?;
    let (code, err) = rt.code(&lab, "add", &At(0, &bad, &path, "c1"))?;
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("network nosuchnet not found"), "{err}");
    let backend = rt.conflist(&lab, 0, "backend")?;
    let (code, err) = rt.code(&lab, "add", &At(0, &backend, &path, "c1"))?;
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("not attachable"), "{err}");
    let conf = rt.conflist(&lab, 0, "appnet")?;
    let (code, err) = rt.code(&lab, "add", &At(0, &conf, "/run/netns/snx-cnif-nosuchns", "c1"))?;
    assert_eq!(code, 4, "a missing namespace: {err}");
    assert!(err.contains("CNI_NETNS /run/netns/snx-cnif-nosuchns"), "{err}");
    assert!(in_ns(&ns, &["ip", "-o", "link"])?.lines().count() == 1, "nothing was made");

    // The plugin run by hand: no stdin, bad stdin, no CNI_NETNS.
    let plugin = rt.dir.join("bin").join("swarmnet");
    let by_hand = |stdin: &[u8], env: &[(&str, &str)]| -> Result<Value> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &lab.nodes[0].ns]).arg(&plugin).stdin(Stdio::piped()).stdout(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn()?;
        child.stdin.take().context("stdin")?.write_all(stdin)?;
        let o = child.wait_with_output()?;
        assert!(!o.status.success(), "the plugin must fail");
        serde_json::from_slice(&o.stdout).with_context(|| format!("CNI error JSON on stdout: {}", String::from_utf8_lossy(&o.stdout)))
    };
    let add = [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "h1"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", path.as_str()), ("CNI_PATH", "/nonexistent")];
    assert_eq!(by_hand(b"", &add)?["code"], 6);
    assert_eq!(by_hand(b"{\"cniVersion\":", &add)?["code"], 6);
    let conf_text = std::fs::read(&conf)?;
    let one: Value = serde_json::from_slice(&conf_text)?;
    let mut single = one["plugins"][0].clone();
    single["cniVersion"] = json!("1.0.0");
    single["name"] = json!("appnet");
    let single = serde_json::to_vec(&single)?;
    let no_netns = [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "h1"), ("CNI_IFNAME", "eth0"), ("CNI_PATH", "/nonexistent")];
    let e = by_hand(&single, &no_netns)?;
    assert_eq!(e["code"], 4, "{e}");
    assert!(e["msg"].as_str().is_some_and(|m| m.contains("CNI_NETNS")), "{e}");

    // ADD twice: the same answer.
    let first: Value = serde_json::from_str(&rt.ok(&lab, "add", &At(0, &conf, &path, "c1"), None)?)?;
    let again = rt.run(&lab, "add", &At(0, &conf, &path, "c1"), None)?;
    let again: Value = serde_json::from_slice(&again.stdout).with_context(|| String::from_utf8_lossy(&again.stderr).into_owned())?;
    assert_eq!(first["ips"], again["ips"], "a repeated ADD answers what the first did");
    // One swarmnet network per namespace: another interface of it, or another container id
    // for the same namespace, is refused (code 100) and leaves c1 as it was.
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet2"])?;
    let conf_b = rt.conflist(&lab, 0, "appnet2")?;
    let (code, err) = rt.code(&lab, "add", &At(0, &conf_b, &path, "c1"))?;
    assert_eq!(code, 100, "{err}");
    assert!(err.contains("attached to network appnet already"), "{err}");
    let (code, err) = rt.code(&lab, "add", &At(0, &conf_b, &path, "c1-other"))?;
    assert_eq!(code, 100, "{err}");
    assert!(err.contains("one swarmnet network per container namespace"), "{err}");
    rt.ok(&lab, "check", &At(0, &conf, &path, "c1"), None)?;
    let net2: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "appnet2"])?)?;
    assert_eq!(net2["endpoints"].as_array().map(Vec::len), Some(0), "the refused ADDs gave their addresses back: {net2}");

    // The agent down: ADD is "try again later", DEL too, and succeeds once it is back.
    let (ns2, path2) = container_ns(&lab, "c2")?;
    let conf2 = rt.conflist(&lab, 1, "appnet")?;
    lab.stop_node(1, libc::SIGKILL)?;
    let (code, err) = rt.code(&lab, "add", &At(1, &conf2, &path2, "c2"))?;
    assert_eq!(code, 11, "{err}");
    let (code, err) = rt.code(&lab, "del", &At(1, &conf2, &path2, "c2"))?;
    assert_eq!(code, 11, "{err}");
    lab.start_node(1)?;
    lab.wait_ready(2, T)?;
    rt.ok(&lab, "del", &At(1, &conf2, &path2, "c2"), None)?;

    // A restart keeps the container's network and adopts it.
    let out: Value = serde_json::from_str(&rt.ok(&lab, "add", &At(1, &conf2, &path2, "c2"), None)?)?;
    let ip2 = out["ips"][0]["address"].as_str().context("address")?.split('/').next().unwrap_or_default().to_string();
    let _server = serve_in(&lab, &ns2, "c2")?;
    assert_eq!(from_task(&lab, 0, "before", "c2")?, "c2");
    lab.stop_node(1, libc::SIGKILL)?;
    assert_eq!(first_line(&ns, &ip2, PORT)?, "c2", "the overlay works while the agent is down");
    lab.start_node(1)?;
    wait_for("node 2's daemon adopting c2", T, || lab.log(1).contains("attached container adopted").then_some(()))?;
    rt.ok(&lab, "check", &At(1, &conf2, &path2, "c2"), None)?;
    assert_eq!(from_task(&lab, 0, "after", "c2")?, "c2");
    let answer = in_ns(&ns2, &["dig", "+short", "+time=2", "+tries=2", "@127.0.0.11", "c1"])?;
    assert_eq!(answer.trim(), first["ips"][0]["address"].as_str().unwrap_or_default().split('/').next().unwrap_or_default(), "the adopted container's resolver answers");

    // Its namespace goes without a DEL: the node takes it off and the manager frees it.
    Command::new("ip").args(["netns", "del", &ns2]).output()?;
    wait_for("c2 gone from the manager's endpoints", T, || {
        let net: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "appnet"]).ok()?).ok()?;
        (!net["endpoints"].as_array()?.iter().any(|e| e["name"] == "c2")).then_some(())
    })?;
    assert!(lab.log(1).contains("namespace is gone without a DEL"), "the node noticed");

    // CNI 1.1's GC and STATUS, by hand (Debian's libcni knows neither): c1 is valid, then
    // it is not.
    let gc = |valid: Value| -> Result<std::process::Output> {
        let conf =
            json!({ "cniVersion": "1.1.0", "name": "appnet", "type": "swarmnet", "network": "appnet", "socket": lab.nodes[0].data_dir.join("control.sock"), "cni.dev/valid-attachments": valid });
        let mut child =
            Command::new("ip").args(["netns", "exec", &lab.nodes[0].ns]).arg(&plugin).env("CNI_COMMAND", "GC").env("CNI_PATH", "/nonexistent").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        child.stdin.take().context("stdin")?.write_all(conf.to_string().as_bytes())?;
        Ok(child.wait_with_output()?)
    };
    assert!(gc(json!([{ "containerID": "c1", "ifname": "eth0" }]))?.status.success());
    rt.ok(&lab, "check", &At(0, &conf, &path, "c1"), None)?;
    assert!(gc(json!([]))?.status.success());
    let (code, err) = rt.code(&lab, "check", &At(0, &conf, &path, "c1"))?;
    assert_eq!(code, 3, "GC took c1 off: {err}");
    assert!(!in_ns(&ns, &["ip", "-o", "link"])?.contains("eth0"), "its interface went");
    let bad = gc(Value::Null)?;
    let e: Value = serde_json::from_slice(&bad.stdout)?;
    assert_eq!(e["code"], 7, "GC without its list is refused: {e}");
    let mut status = Command::new("ip").args(["netns", "exec", &lab.nodes[0].ns]).arg(&plugin).env("CNI_COMMAND", "STATUS").stdin(Stdio::piped()).spawn()?;
    status.stdin.take().context("stdin")?.write_all(&single)?;
    assert!(status.wait()?.success(), "STATUS: the daemon answers");

    // 100 ADDs at once on one node, then 100 DELs.
    let mut made = Vec::new();
    for k in 0..100 {
        made.push(container_ns(&lab, &format!("p{k}"))?);
    }
    let results = all_at_once(&rt, &lab, &conf, &made, "add");
    let mut ips = std::collections::BTreeSet::new();
    for r in results {
        let v: Value = serde_json::from_str(&r?)?;
        ips.insert(v["ips"][0]["address"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(ips.len(), 100, "100 distinct addresses");
    let reached = first_line(&made[99].0, &task_address(&lab)?, PORT)?;
    assert!(reached.starts_with("web."), "the last container reaches a task over the overlay: {reached}");
    let dels = all_at_once(&rt, &lab, &conf, &made, "del");
    for d in dels {
        d?;
    }
    wait_for("every address given back", T, || {
        let net: Value = serde_json::from_str(&lab.cli_ok(0, &["network", "inspect", "appnet"]).ok()?).ok()?;
        (!net["endpoints"].as_array()?.iter().any(|e| e["name"].as_str().is_some_and(|n| n.starts_with('p')))).then_some(())
    })?;
    for (ns, _) in &made {
        wait_for("a container's links gone", T, || (!in_ns(ns, &["ip", "-o", "link"]).ok()?.contains("eth0")).then_some(()))?;
    }
    // DEL answers before its links are gone; an ADD into the same namespace right after it
    // (another container id: a runtime's new container in the pod's namespace) waits for them.
    let (_, p0) = &made[0];
    rt.ok(&lab, "add", &At(0, &conf, p0, "p0"), None)?;
    rt.ok(&lab, "del", &At(0, &conf, p0, "p0"), None)?;
    rt.ok(&lab, "add", &At(0, &conf, p0, "p0-new"), None)?;
    rt.ok(&lab, "check", &At(0, &conf, p0, "p0-new"), None)?;
    rt.ok(&lab, "del", &At(0, &conf, p0, "p0-new"), None)?;
    for (n, _) in &made {
        Command::new("ip").args(["netns", "del", n]).output()?;
    }
    Ok(())
}

/// `verb` for every container of `made` (named p0, p1, …) on node 1, all at once.
fn all_at_once(rt: &Runtime, lab: &Lab, conf: &Path, made: &[(String, String)], verb: &str) -> Vec<Result<String>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = made.iter().enumerate().map(|(k, (_, p))| s.spawn(move || rt.ok(lab, verb, &At(0, conf, p, &format!("p{k}")), None))).collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))).collect()
    })
}

/// A task's address (what a container on the overlay can reach).
fn task_address(lab: &Lab) -> Result<String> {
    let t = lab.running_tasks("web")?;
    t.first().and_then(|t| t["addresses"].as_object()?.values().next()?.as_str().map(str::to_string)).with_context(|| format!("web's first task has no address: {t:?}"))
}
