//! The one-machine lab: N "hosts" made of network namespaces joined by an underlay bridge
//! that lives in a namespace of its own, so nothing of the lab touches the machine's own
//! namespace or routes. Each node runs a `swarmnet` daemon (node 1 the manager).
//!
//! Every object is named after the lab (`<lab>-n1`, `<lab>-ul`, …); every process it starts
//! carries `SWARMNET_LAB=<lab>` in its environment, and so do the tasks those daemons start.
//! `cleanup` removes exactly those, so a crashed run is cleaned up by the next one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub const UNDERLAY_PREFIX: &str = "10.210.0";
const LAB_ROOT: &str = "/run/swarmnet-lab";

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lab needs root (network namespaces, veths, bridges): run the tests as root");
    }
    Ok(())
}

/// A folder of a test's own (`$TMPDIR/<name>-<pid>`, made empty), removed when dropped: when
/// the test ends, passed or not.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir(name: &str) -> Result<TempDir> {
    let d = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).with_context(|| format!("make {}", d.display()))?;
    Ok(TempDir(d))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// The `swarmnet` binary: `$SWARMNET_BIN`, or built once with cargo.
pub fn binary() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("SWARMNET_BIN") {
            return Ok(PathBuf::from(p));
        }
        let root = workspace_root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo).args(["build", "-q", "-j2", "--workspace", "--exclude", "swarmnet-ebpf"]).current_dir(&root).status().map_err(|e| format!("run cargo build: {e}"))?;
        if !st.success() {
            return Err("cargo build --workspace failed".into());
        }
        let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
        Ok(target.join("debug").join("swarmnet"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// The bpffs every lab's daemons pin in, mounted in the machine's mount namespace (the
/// daemons' namespaces, made by `ip netns exec`, receive it).
pub fn lab_bpffs() -> Result<PathBuf> {
    let p = Path::new(LAB_ROOT).join("bpffs");
    swarmnet_dataplane::lb::host::ensure_bpffs(&p).with_context(|| format!("mount bpffs at {}", p.display()))?;
    Ok(p)
}

/// The load balancer's programs on the root of cgroup2 (ADR 0024): how many the kernel
/// lists there (bpftool), and how many pinned links of lab nodes (in the lab's bpffs) are
/// attached there. Equal: nothing is attached twice or left attached unpinned.
pub fn lb_programs_on_root() -> Result<(usize, usize, PathBuf)> {
    use swarmnet_dataplane::bpf_link::{cgroup_id, pinned_target, LinkTarget};
    let cg2 = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next() == Some("cgroup2")).then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount")?;
    let out = Command::new("bpftool").args(["cgroup", "show"]).arg(&cg2).output().context("bpftool (bash .ci/setup installs it)")?;
    let listed = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("sn_")).count();
    let root = cgroup_id(&cg2)?;
    let mut pinned = 0;
    for node in std::fs::read_dir(lab_bpffs()?.join("swarmnet")).into_iter().flatten().flatten() {
        for e in std::fs::read_dir(node.path().join("lb-v1")).into_iter().flatten().flatten() {
            let p = e.path();
            if p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with("link_")) && matches!(pinned_target(&p), Ok(LinkTarget::Cgroup(id)) if id == root) {
                pinned += 1;
            }
        }
    }
    Ok((listed, pinned, cg2))
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    Ok(out)
}

fn sh(args: &[&str]) -> Result<String> {
    let out = run(Command::new(args[0]).args(&args[1..]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes every trace of lab `name`: its processes (daemons and their tasks), its
/// namespaces and its files.
pub fn cleanup(name: &str) -> Result<()> {
    let marker = format!("SWARMNET_LAB={name}");
    let me = std::process::id();
    for pid in lab_pids(&marker) {
        if pid != me {
            // Processes this lab started, found by the marker it gave them.
            let _ = send_signal(pid, libc::SIGKILL);
        }
    }
    // Give the kernel a moment to reap before the namespaces go.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab_pids(&marker).into_iter().all(|p| p == me) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let list = sh(&["ip", "netns", "list"]).unwrap_or_default();
    for line in list.lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        if ns.starts_with(&format!("{name}-")) {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
    // The nodes' cgroups and pinned maps and links (keyed by the node ids their data dirs
    // hold), and any folder named after the lab (the layout before issue 19, which tests
    // rebuild).
    let dir = Path::new(LAB_ROOT).join(name);
    let mut ids = node_ids_under(&dir, 3);
    ids.extend(std::fs::read_to_string(dir.join(RAN_AS)).unwrap_or_default().lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string));
    ids.sort();
    ids.dedup();
    swarmnet_dataplane::lb::host::remove_nodes(&ids).with_context(|| format!("remove the cgroups and bpffs pins of lab {name}"))?;
    swarmnet_dataplane::lb::host::remove_leftovers(&format!("{name}-")).with_context(|| format!("remove the cgroups and bpffs pins of lab {name}"))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    Ok(())
}

/// Every node id a lab's daemons ran as and were stopped as, one per line (in the lab's
/// folder).
const RAN_AS: &str = "node-ids-stopped";

/// The node ids of the data dirs under `dir` (`node/identity.json`), down to `depth`.
fn node_ids_under(dir: &Path, depth: usize) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(id) = node_id_of(dir) {
        out.push(id);
    }
    if depth > 0 {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) && e.file_name() != "node" {
                out.extend(node_ids_under(&e.path(), depth - 1));
            }
        }
    }
    out
}

/// The node id a data dir holds, if it has joined.
pub fn node_id_of(data_dir: &Path) -> Option<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(data_dir.join("node").join("identity.json")).ok()?).ok()?;
    v["node_id"].as_str().map(str::to_string)
}

fn send_signal(pid: u32, sig: i32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) with a positive pid only sends a signal; no memory is involved.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn lab_pids(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()) {
            // A zombie has no environment left to read, so it is not listed here.
            out.push(pid);
        }
    }
    out
}

pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z'))).unwrap_or(false)
}

/// The Docker API's socket in every lab node's data dir.
pub const LAB_DOCKER_SOCKET: &str = "docker.sock";

/// Where every lab daemon serves its metrics, on its node's address (unless
/// `SWARMNET_LAB_METRICS=off`, for the benchmark that compares the two).
pub const LAB_METRICS_PORT: u16 = 9323;

pub struct LabNode {
    pub ns: String,
    /// The hostname of the node's daemon (its own UTS namespace, as a machine of its own):
    /// the namespace's name unless a test changes it before a start.
    pub hostname: String,
    pub addr: String,
    pub data_dir: PathBuf,
    pub pid: Option<u32>,
    /// The managers (indexes) an agent's `--join` names: every manager unless a test
    /// chooses.
    pub join: Option<Vec<usize>>,
}

pub struct Lab {
    pub name: String,
    pub nodes: Vec<LabNode>,
    pub bin: PathBuf,
    pub heartbeat: f64,
    token: Option<String>,
    keep: bool,
    manager_args: Vec<String>,
    /// Flags for every node's daemon (manager and agents).
    node_args: Vec<String>,
    /// The etcd members (none unless the lab was made with some).
    pub etcd: Vec<EtcdMember>,
    /// Nodes 0..managers run `swarmnet manager` (several only with etcd); the rest agents.
    pub managers: usize,
}

/// An etcd member of the lab: a host of its own on the underlay (namespace `<lab>-e<k>`,
/// address `<underlay>.<240 + k>`), its data under the lab's folder.
pub struct EtcdMember {
    pub ns: String,
    pub addr: String,
    pub data_dir: PathBuf,
    pub pid: Option<u32>,
}

/// The lab's etcd members: Debian's `etcd-server`, one per host.
pub const ETCD_FIRST_HOST: u8 = 241;

impl Lab {
    /// Builds `nodes` hosts and starts daemons on the first `start` of them (node 1 is the
    /// manager), then waits until the manager lists `start` ready nodes.
    pub fn up(name: &str, nodes: usize, start: usize, heartbeat: f64) -> Result<Lab> {
        Self::up_with(name, nodes, start, heartbeat, &[])
    }

    /// Like `up`, with extra flags for the manager (e.g. `--data-path-port 4790`).
    pub fn up_with(name: &str, nodes: usize, start: usize, heartbeat: f64, manager_args: &[&str]) -> Result<Lab> {
        Self::up_full(name, nodes, start, heartbeat, manager_args, &[])
    }

    /// Like `up_with`, with flags for every node's daemon too (e.g. `--dns ADDR`).
    pub fn up_full(name: &str, nodes: usize, start: usize, heartbeat: f64, manager_args: &[&str], node_args: &[&str]) -> Result<Lab> {
        Self::up_inner(name, nodes, start, heartbeat, manager_args, node_args, None, 0)
    }

    /// Like `up_with`, with an etcd cluster of `members` members on hosts of their own
    /// holding the cluster (`--store etcd://…`), and `managers` managers on it (nodes
    /// 0..managers; the first one started creates the cluster).
    pub fn up_etcd(name: &str, nodes: usize, start: usize, heartbeat: f64, members: usize, managers: usize, manager_args: &[&str]) -> Result<Lab> {
        if managers == 0 || managers > nodes || members == 0 {
            bail!("lab {name}: {managers} managers of {nodes} nodes on {members} etcd members is out of range");
        }
        let mut lab = Self::up_inner(name, nodes, 0, heartbeat, manager_args, &[], None, members)?;
        lab.managers = managers;
        for i in 0..start {
            lab.start_node(i)?;
        }
        lab.wait_ready(start, Duration::from_secs(30))?;
        Ok(lab)
    }

    /// A one-manager cluster on the embedded store, with `members` etcd members beside it
    /// (unused until a test moves the cluster there: `--import`).
    pub fn up_redb_beside_etcd(name: &str, nodes: usize, start: usize, heartbeat: f64, members: usize) -> Result<Lab> {
        let mut lab = Self::up_inner(name, nodes, 0, heartbeat, &[], &[], None, members)?;
        lab.manager_args.clear();
        for i in 0..start {
            lab.start_node(i)?;
        }
        lab.wait_ready(start, Duration::from_secs(30))?;
        Ok(lab)
    }

    /// Like `up`, every node's daemon with hostname `hostname` (as nodes in containers on one
    /// machine may be).
    pub fn up_same_hostname(name: &str, nodes: usize, start: usize, heartbeat: f64, hostname: &str) -> Result<Lab> {
        Self::up_inner(name, nodes, start, heartbeat, &[], &[], Some(hostname), 0)
    }

    #[allow(clippy::too_many_arguments)]
    fn up_inner(name: &str, nodes: usize, start: usize, heartbeat: f64, manager_args: &[&str], node_args: &[&str], hostname: Option<&str>, etcd: usize) -> Result<Lab> {
        require_root()?;
        if etcd > 5 {
            bail!("lab {name}: {etcd} etcd members is out of range (0-5)");
        }
        if nodes == 0 || nodes > 200 || start > nodes {
            bail!("lab {name}: {nodes} nodes (start {start}) is out of range");
        }
        cleanup(name)?;
        let bin = binary()?;
        let root = Path::new(LAB_ROOT).join(name);
        std::fs::create_dir_all(&root)?;
        let ul = format!("{name}-ul");
        sh(&["ip", "netns", "add", &ul])?;
        sh(&["ip", "-n", &ul, "link", "add", "snbr0", "type", "bridge"])?;
        sh(&["ip", "-n", &ul, "link", "set", "snbr0", "up"])?;
        let mut lab = Lab {
            name: name.to_string(),
            nodes: Vec::new(),
            bin,
            heartbeat,
            token: None,
            keep: false,
            manager_args: manager_args.iter().map(|a| a.to_string()).collect(),
            node_args: node_args.iter().map(|a| a.to_string()).collect(),
            etcd: Vec::new(),
            managers: 1,
        };
        for i in 1..=nodes {
            let ns = format!("{name}-n{i}");
            let addr = format!("{UNDERLAY_PREFIX}.{i}");
            sh(&["ip", "netns", "add", &ns])?;
            let port = format!("snv{i}");
            sh(&["ip", "-n", &ul, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            sh(&["ip", "-n", &ul, "link", "set", &port, "master", "snbr0", "up"])?;
            sh(&["ip", "-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            let data_dir = root.join(format!("n{i}"));
            std::fs::create_dir_all(&data_dir)?;
            lab.nodes.push(LabNode { hostname: hostname.map_or_else(|| ns.clone(), str::to_string), ns, addr, data_dir, pid: None, join: None });
        }
        for k in 1..=etcd {
            let ns = format!("{name}-e{k}");
            let host = ETCD_FIRST_HOST + u8::try_from(k - 1).unwrap_or(0);
            lab.host_on_underlay(&ns, &format!("snet{k}"), host)?;
            lab.etcd.push(EtcdMember { ns, addr: format!("{UNDERLAY_PREFIX}.{host}"), data_dir: root.join(format!("etcd-e{k}")), pid: None });
        }
        for k in 0..etcd {
            lab.start_etcd(k)?;
        }
        if etcd > 0 {
            let store = format!("etcd://{}", lab.etcd.iter().map(|m| format!("{}:2379", m.addr)).collect::<Vec<_>>().join(","));
            lab.manager_args.splice(0..0, ["--store".to_string(), store]);
        }
        for i in 0..start {
            lab.start_node(i)?;
        }
        if start > 0 {
            lab.wait_ready(start, Duration::from_secs(30))?;
        }
        Ok(lab)
    }

    /// A host of the lab's underlay outside the cluster: namespace `ns`, bridge port `port`,
    /// address `<underlay>.<host>`.
    fn host_on_underlay(&self, ns: &str, port: &str, host: u8) -> Result<()> {
        let ul = format!("{}-ul", self.name);
        sh(&["ip", "netns", "add", ns])?;
        sh(&["ip", "-n", &ul, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        sh(&["ip", "-n", &ul, "link", "set", port, "master", "snbr0", "up"])?;
        sh(&["ip", "-n", ns, "addr", "add", &format!("{UNDERLAY_PREFIX}.{host}/24"), "dev", "eth0"])?;
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// The store flag the lab's manager runs with (`etcd://…`), if the lab has etcd.
    pub fn etcd_endpoints(&self) -> String {
        self.etcd.iter().map(|m| format!("{}:2379", m.addr)).collect::<Vec<_>>().join(",")
    }

    /// Starts etcd member `k` (0-based) with its data (a restart keeps it), and waits until
    /// it listens.
    pub fn start_etcd(&mut self, k: usize) -> Result<()> {
        let cluster = self.etcd.iter().enumerate().map(|(j, m)| format!("e{}=http://{}:2380", j + 1, m.addr)).collect::<Vec<_>>().join(",");
        let m = &self.etcd[k];
        std::fs::create_dir_all(&m.data_dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(m.data_dir.join("etcd.log"))?;
        let c = format!("http://{}:2379", m.addr);
        let p = format!("http://{}:2380", m.addr);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &m.ns, "etcd", "--name", &format!("e{}", k + 1), "--data-dir"])
            .arg(m.data_dir.join("data"))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c, "--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
            .args(["--initial-cluster", &cluster, "--initial-cluster-state", "new", "--initial-cluster-token", &self.name])
            .env("SWARMNET_LAB", &self.name)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().with_context(|| format!("start etcd in {} (`bash .ci/setup` installs etcd-server)", m.ns))?;
        let pid = child.id();
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        self.etcd[k].pid = Some(pid);
        let (ns, addr) = (self.etcd[k].ns.clone(), self.etcd[k].addr.clone());
        let probe = format!("exec 3<>/dev/tcp/{addr}/2379");
        wait_for(&format!("etcd in {ns} to listen"), Duration::from_secs(20), || {
            if !pid_alive(pid) {
                return Some(false);
            }
            sh(&["ip", "netns", "exec", &ns, "bash", "-c", &probe]).ok().map(|_| true)
        })
        .and_then(|up| if up { Ok(()) } else { bail!("etcd in {ns} exited; its log:\n{}", std::fs::read_to_string(self.etcd[k].data_dir.join("etcd.log")).unwrap_or_default()) })
    }

    /// Sends `sig` to etcd member `k` and waits for it to exit (SIGSTOP: only sends it).
    pub fn stop_etcd(&mut self, k: usize, sig: i32) -> Result<()> {
        let Some(pid) = self.etcd[k].pid else { return Ok(()) };
        send_signal(pid, sig)?;
        if sig == libc::SIGSTOP || sig == libc::SIGCONT {
            return Ok(());
        }
        self.etcd[k].pid = None;
        wait_for(&format!("etcd in {} to exit", self.etcd[k].ns), Duration::from_secs(15), || (!pid_alive(pid)).then_some(()))
    }

    /// A host on the lab's underlay that is not part of the cluster (namespace
    /// `<lab>-cl`, address `<underlay>.250`): the outside client of published ports.
    /// Made once; returns its namespace.
    pub fn outside_client(&self) -> Result<String> {
        self.outside_client_at(0)
    }

    /// Outside client number `i` (0–4): namespace `<lab>-cl` (0) or `<lab>-cl<i>`, address
    /// `<underlay>.<250 + i>`.
    pub fn outside_client_at(&self, i: u8) -> Result<String> {
        if i > 4 {
            bail!("lab {}: outside client {i} is out of range (0-4)", self.name);
        }
        let ns = if i == 0 { format!("{}-cl", self.name) } else { format!("{}-cl{i}", self.name) };
        if sh(&["ip", "netns", "list"])?.lines().any(|l| l.split_whitespace().next() == Some(ns.as_str())) {
            return Ok(ns);
        }
        let ul = format!("{}-ul", self.name);
        let port = format!("sncl{i}");
        sh(&["ip", "netns", "add", &ns])?;
        sh(&["ip", "-n", &ul, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        sh(&["ip", "-n", &ul, "link", "set", &port, "master", "snbr0", "up"])?;
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{UNDERLAY_PREFIX}.{}/24", 250 + u16::from(i)), "dev", "eth0"])?;
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Leaves everything in place when dropped (for `xtask lab up`).
    pub fn keep(mut self) {
        self.keep = true;
    }

    pub fn control(&self, i: usize) -> String {
        format!("unix://{}", self.nodes[i].data_dir.join("control.sock").display())
    }

    /// Starts the daemon of node `i` (0-based): the manager on node 0, agents elsewhere.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        // A restarted node keeps its identity and needs no token.
        let token = if i >= self.managers && !self.nodes[i].data_dir.join("node").join("identity.json").exists() { Some(self.token()?) } else { None };
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(node.data_dir.join("daemon.log"))?;
        // Each node's daemon (and its tasks) gets a UTS namespace and a hostname of its own,
        // as separate machines have; then its network namespace.
        let mut cmd = Command::new("unshare");
        cmd.args(["--uts", "--", "sh", "-c", "printf %s \"$0\" > /proc/sys/kernel/hostname && exec \"$@\"", &node.hostname, "ip", "netns", "exec", &node.ns]).arg(&self.bin);
        let hb = self.heartbeat.to_string();
        if i < self.managers {
            cmd.args(["manager", "--advertise-addr", &node.addr, "--heartbeat-interval", &hb]).args(&self.manager_args);
        } else {
            let chosen: Vec<usize> = node.join.clone().unwrap_or_else(|| (0..self.managers).collect());
            let managers = chosen.iter().map(|&m| format!("{}:2377", self.nodes[m].addr)).collect::<Vec<_>>().join(",");
            cmd.args(["agent", "--join", &managers, "--advertise-addr", &node.addr]);
            if let Some(token) = &token {
                cmd.args(["--token", token]);
            }
        }
        // `ip netns exec` gives the daemon a mount namespace of its own: its pins must live in
        // a bpffs of the machine's, or they would die with it (unless the test names one).
        cmd.arg("--data-dir").arg(&node.data_dir);
        if !self.node_args.iter().any(|a| a == "--bpffs") {
            cmd.arg("--bpffs").arg(lab_bpffs()?);
        }
        // Metrics on, on the node's own address (issue 21: the lab and the demo turn them on).
        if !self.node_args.iter().any(|a| a == "--metrics-addr") && std::env::var("SWARMNET_LAB_METRICS").as_deref() != Ok("off") {
            cmd.arg("--metrics-addr").arg(format!("{}:{LAB_METRICS_PORT}", node.addr));
        }
        // And the Docker API, on a socket in its data dir.
        if !self.node_args.iter().any(|a| a == "--docker-api") {
            cmd.arg("--docker-api").arg(format!("unix://{}", node.data_dir.join(LAB_DOCKER_SOCKET).display()));
        }
        cmd.args(&self.node_args);
        cmd.env("SWARMNET_LAB", &self.name).env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // A killed daemon leaves its socket file: the new one's is waited for below.
        let sock = self.nodes[i].data_dir.join("control.sock");
        let _ = std::fs::remove_file(&sock);
        let child = cmd.spawn().with_context(|| format!("start the daemon of {}", node.ns))?;
        let pid = child.id();
        // The daemon is reaped by a thread so that a killed one does not linger as a zombie.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        self.nodes[i].pid = Some(pid);
        std::fs::write(self.nodes[i].data_dir.join("daemon.pid"), pid.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if Instant::now() > deadline || !pid_alive(pid) {
                bail!("daemon of {} did not come up; its log:\n{}", self.nodes[i].ns, self.log(i));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The manager's extra arguments from the next start of node 0 on.
    pub fn set_manager_args(&mut self, args: &[&str]) {
        self.manager_args = args.iter().map(|a| a.to_string()).collect();
    }

    /// The id of node `i` (once it has joined).
    pub fn node_id(&self, i: usize) -> Result<String> {
        node_id_of(&self.nodes[i].data_dir).with_context(|| format!("{}: no node identity in {}", self.nodes[i].ns, self.nodes[i].data_dir.display()))
    }

    /// The pid of node `i`'s daemon, if it runs.
    pub fn daemon_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].pid
    }

    /// Sends `sig` to node `i`'s daemon and waits for it to exit.
    pub fn stop_node(&mut self, i: usize, sig: i32) -> Result<()> {
        let Some(pid) = self.nodes[i].pid.take() else { return Ok(()) };
        // The identity it ran as: a later start may replace it (--force-new-cluster, a new
        // data dir), and the clean-up must still find this one's cgroup and pins.
        if let Some(id) = node_id_of(&self.nodes[i].data_dir) {
            use std::io::Write;
            let ids = Path::new(LAB_ROOT).join(&self.name).join(RAN_AS);
            std::fs::OpenOptions::new().create(true).append(true).open(&ids).and_then(|mut f| writeln!(f, "{id}")).with_context(|| format!("record node id {id} in {}", ids.display()))?;
        }
        send_signal(pid, sig)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while pid_alive(pid) {
            if Instant::now() > deadline {
                bail!("daemon of {} (pid {pid}) did not exit after signal {sig}", self.nodes[i].ns);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].data_dir.join("daemon.log")).unwrap_or_default()
    }

    fn token(&mut self) -> Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let t = self.cli_ok(0, &["join-token", "worker", "--quiet"])?.trim().to_string();
        self.token = Some(t.clone());
        Ok(t)
    }

    /// Runs the CLI against node `i`'s daemon.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<Output> {
        run(Command::new(&self.bin).arg("--host").arg(self.control(i)).args(args))
    }

    /// Runs the CLI and fails with its stderr unless it succeeds.
    pub fn cli_ok(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self.cli(i, args)?;
        if !out.status.success() {
            bail!("swarmnet {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the CLI and fails unless it fails; returns its stderr.
    pub fn cli_err(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self.cli(i, args)?;
        if out.status.success() {
            bail!("swarmnet {} succeeded but should have failed: {}", args.join(" "), String::from_utf8_lossy(&out.stdout).trim());
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Runs the CLI and fails unless it fails; returns its exit code and stderr.
    pub fn cli_fail(&self, i: usize, args: &[&str]) -> Result<(i32, String)> {
        let out = self.cli(i, args)?;
        if out.status.success() {
            bail!("swarmnet {} succeeded but should have failed: {}", args.join(" "), String::from_utf8_lossy(&out.stdout).trim());
        }
        Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned()))
    }

    pub fn cli_json(&self, i: usize, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        let s = self.cli_ok(i, &a)?;
        serde_json::from_str(&s).with_context(|| format!("swarmnet {}: not JSON: {s}", args.join(" ")))
    }

    pub fn wait_ready(&self, n: usize, timeout: Duration) -> Result<Value> {
        wait_for(&format!("{n} ready nodes"), timeout, || {
            let v = self.cli_json(0, &["node", "ls"]).ok()?;
            let ready = v.as_array()?.iter().filter(|n| n["status"] == "ready").count();
            (ready == n).then_some(v)
        })
    }

    /// Tasks of `service` that are wanted and running.
    pub fn running_tasks(&self, service: &str) -> Result<Vec<Value>> {
        let v = self.cli_json(0, &["service", "ps", service])?;
        Ok(v.as_array().map(|a| a.iter().filter(|t| t["desired_state"] == "running" && t["state"] == "running").cloned().collect()).unwrap_or_default())
    }

    /// Waits until `service` has exactly `n` tasks, all wanted and running, and no others.
    pub fn wait_service(&self, service: &str, n: usize, timeout: Duration) -> Result<Vec<Value>> {
        wait_for(&format!("{service}: exactly {n} running tasks and no others"), timeout, || {
            let all = self.cli_json(0, &["service", "ps", service]).ok()?;
            let all = all.as_array()?.clone();
            let running: Vec<Value> = all.iter().filter(|t| t["desired_state"] == "running" && t["state"] == "running").cloned().collect();
            (running.len() == n && all.len() == n).then_some(running)
        })
    }

    pub fn down(&mut self) -> Result<()> {
        cleanup(&self.name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // SWARMNET_LAB_KEEP=1 leaves a lab in place for a look after a failed test (`cargo
        // xtask lab down`, or the next run of the test, removes it).
        if !self.keep && std::env::var_os("SWARMNET_LAB_KEEP").is_none() {
            let _ = cleanup(&self.name);
        }
    }
}

/// Polls `f` every 50 ms until it returns Some, or fails after `timeout` saying what it
/// waited for.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command inside the network namespace of process `pid`.
pub fn in_netns_of(pid: u32, args: &[&str]) -> Result<String> {
    let p = pid.to_string();
    let mut a = vec!["nsenter", "-t", &p, "-n", "--"];
    a.extend_from_slice(args);
    sh(&a)
}

/// Runs a command inside the network and mount namespaces of process `pid` (as the task
/// itself sees the world: its resolv.conf and hosts).
pub fn in_task(pid: u32, args: &[&str]) -> Result<String> {
    let p = pid.to_string();
    let mut a = vec!["nsenter", "-t", &p, "-n", "-m", "--"];
    a.extend_from_slice(args);
    sh(&a)
}

/// Runs a command inside a named namespace of the lab.
pub fn in_ns(ns: &str, args: &[&str]) -> Result<String> {
    let mut a = vec!["ip", "netns", "exec", ns];
    a.extend_from_slice(args);
    sh(&a)
}
