//! A node's kernel state belongs to its identity (issue 19): its cgroup and bpffs folders
//! are keyed by its node id, so a new hostname, the layout before issue 19 (folders named
//! after the hostname), two nodes of one name on one kernel, a pinned link whose interface
//! is gone, and a second daemon with the same identity are all handled.
//!
//! The lab gives every node's daemon a UTS namespace and a hostname of its own (as separate
//! machines have); a test changes a node's hostname before restarting it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use swarmnet_lab::{in_ns, tempdir, wait_for, Lab, TempDir};

const T: Duration = Duration::from_secs(60);
const PORT: &str = "7000";

fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name).display().to_string()
}

fn vip(lab: &Lab) -> Result<String> {
    let v: Value = serde_json::from_str(&lab.cli_ok(0, &["service", "inspect", "web"])?)?;
    v["vips"]["appnet"].as_str().map(str::to_string).with_context(|| format!("web has no VIP: {v}"))
}

/// A client task on node `i` that makes `n` new connections to the VIP each time it is
/// told to (`lb_client.py on-demand`): it outlives daemon restarts, as a user's task does.
struct VipClient {
    dir: TempDir,
    round: u32,
}

impl VipClient {
    fn start(lab: &Lab, i: usize, vip: &str) -> Result<VipClient> {
        let dir = tempdir(&format!("{}-client", lab.name))?;
        let d = dir.display().to_string();
        lab.cli_ok(i, &["run", "--detach", "--name", "vipclient", "--network", "appnet", "--", "python3", &script("lb_client.py"), "on-demand", vip, PORT, "30", &d])?;
        Ok(VipClient { dir, round: 0 })
    }

    /// 30 new connections to the VIP from the task: which task answered each, and the errors.
    fn round(&mut self) -> Result<Value> {
        self.round += 1;
        std::fs::write(self.dir.join(format!("go{}", self.round)), b"")?;
        let result = self.dir.join(format!("result{}", self.round));
        let text = wait_for("the client task's 30 connections", Duration::from_secs(200), || std::fs::read_to_string(&result).ok())?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Every one of the client's 30 connections reached a task in `names`.
fn assert_all_reach(what: &str, r: &Value, names: &[&str]) {
    let counts = r["counts"].as_object().cloned().unwrap_or_default();
    let reached: u64 = counts.values().filter_map(Value::as_u64).sum();
    assert!(r["errors"].as_array().is_some_and(|e| e.is_empty()), "{what}: connections failed: {r}");
    assert_eq!(reached, 30, "{what}: {r}");
    assert!(counts.keys().all(|k| names.contains(&k.as_str())), "{what}: a connection reached a task that is gone: {r}");
}

/// The node's programs on its cgroup, as the kernel lists them (bpftool).
fn programs_on(cgroup: &Path) -> Result<usize> {
    let out = std::process::Command::new("bpftool").args(["cgroup", "show"]).arg(cgroup).output().context("bpftool (bash .ci/setup installs it)")?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("sn_")).count())
}

/// The programs on cgroup2's root are exactly the lab nodes' pinned links there.
fn assert_root_programs(when: &str) -> Result<()> {
    let (listed, pinned, root) = swarmnet_lab::lb_programs_on_root()?;
    assert!(pinned >= 12, "{when}: three nodes' four links each are pinned on {}: {pinned}", root.display());
    assert_eq!(listed, pinned, "{when}: the programs on {} are the pinned links", root.display());
    Ok(())
}

/// How many of node `i`'s pinned load-balancer links are attached to `cgroup`.
fn links_on(lab: &Lab, i: usize, cgroup: &Path) -> Result<usize> {
    use swarmnet_dataplane::bpf_link::{cgroup_id, pinned_target, LinkTarget};
    let want = cgroup_id(cgroup)?;
    let pins = swarmnet_lab::lab_bpffs()?.join("swarmnet").join(lab.node_id(i)?).join("lb-v1");
    let mut n = 0;
    for e in std::fs::read_dir(&pins)? {
        let p = e?.path();
        if p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with("link_")) && matches!(pinned_target(&p)?, LinkTarget::Cgroup(id) if id == want) {
            n += 1;
        }
    }
    Ok(n)
}

/// The cgroup2 path of each task process of node `i`.
fn task_cgroups(lab: &Lab, i: usize) -> Vec<String> {
    swarmnet_dataplane::task::find_task_processes(&lab.nodes[i].data_dir)
        .into_iter()
        .filter_map(|(_, pid, _)| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)))
        .collect()
}

/// Scales web to `n` and waits until node `i`'s load balancer has exactly `n` active
/// backends for its VIP.
fn scale_and_wait(lab: &Lab, i: usize, vip: &str, n: usize) -> Result<()> {
    lab.cli_ok(0, &["service", "scale", &format!("web={n}")])?;
    lab.wait_service("web", n, T)?;
    wait_for(&format!("node {} programs {n} backends for {vip}", i + 1), T, || {
        let t = lab.cli_json(i, &["lb", "ls"]).ok()?;
        let s = t["services"].as_array()?.iter().find(|s| s["vip"] == vip)?.clone();
        (s["backends"].as_array()?.iter().filter(|b| b["state"] == "active").count() == n).then_some(())
    })?;
    Ok(())
}

/// Rebuilds the layout before issue 19 on stopped node `i`, exactly as its daemon made it:
/// cgroup and bpffs folders named after the hostname, the load balancer's programs attached
/// to that cgroup (with the node's maps, as programmed), and the node's tasks in it.
fn rebuild_old_layout(lab: &Lab, i: usize) -> Result<()> {
    use swarmnet_dataplane::lb::{host, EbpfLb, Host};
    let id = lab.node_id(i)?;
    let name = lab.nodes[i].hostname.clone();
    let bpffs = swarmnet_lab::lab_bpffs()?;
    let top = bpffs.join("swarmnet");
    std::fs::rename(top.join(&id), top.join(&name)).context("move the node's pins under its hostname")?;
    let mut old = Host::prepare(&name, Some(&bpffs))?;
    // Agents of that layout attached to the node's own cgroup.
    old.attach_to = old.cgroup.clone();
    // Attached to the cgroup named after the hostname, on the node's own maps.
    let lock = tempdir(&format!("{}-oldlock", lab.name))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let ns = swarmnet_dataplane::netns::NsWorker::start()?;
        drop(EbpfLb::open(&old, ns, &lock.join("lb.lock"))?);
        Ok::<(), anyhow::Error>(())
    })?;
    let new = host::node_cgroup(&id).context("the node's cgroup")?;
    let procs: Vec<String> = std::fs::read_to_string(new.join("cgroup.procs"))?.lines().map(str::to_string).collect();
    for pid in &procs {
        let _ = std::fs::write(old.cgroup.join("cgroup.procs"), pid);
    }
    std::fs::remove_dir(&new).with_context(|| format!("remove {}", new.display()))?;
    if programs_on(&old.cgroup)? != 4 {
        bail!("the old layout's cgroup {} does not hold the 4 programs", old.cgroup.display());
    }
    Ok(())
}

/// One node's restarts under a new hostname, in the layout before issue 19, and with its
/// underlay interface replaced: each time, its adopted client task's new connections to a
/// VIP reach only the tasks that are there after a scale-down (with the programs of a stale
/// cgroup, 20 of 30 went to removed tasks), and the routing mesh's eBPF entry is attached.
#[test]
fn a_nodes_kernel_state_follows_its_id_across_hostnames_layouts_and_interfaces() -> Result<()> {
    let mut lab = Lab::up("snx-ident", 3, 3, 1.0)?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "6", "--publish", "8080:7000", "--network", "appnet", "--", "python3", &script("lb_server.py"), PORT])?;
    lab.wait_service("web", 6, T)?;
    let vip = vip(&lab)?;
    let id = lab.node_id(1)?;
    let mut client = VipClient::start(&lab, 1, &vip)?;
    assert_all_reach("before any restart", &client.round()?, &["web.1", "web.2", "web.3", "web.4", "web.5", "web.6"]);
    let cgroup = swarmnet_dataplane::lb::host::node_cgroup(&id).context("node 2's cgroup")?;
    assert!(cgroup.ends_with(&id), "the cgroup is named after the node id: {}", cgroup.display());
    // The programs are on the root of cgroup2 (every process of a task's namespace, whatever
    // its cgroup; issue 22), four per node.
    let root = cgroup.parent().and_then(Path::parent).context("cgroup2's root")?.to_path_buf();
    assert_root_programs("at the start")?;
    assert_eq!(links_on(&lab, 1, &root)?, 4, "node 2's pinned links are attached to the root");

    // 1. A new hostname.
    lab.stop_node(1, libc::SIGKILL)?;
    lab.nodes[1].hostname = "snx-ident-renamed".into();
    lab.start_node(1)?;
    wait_for("node ls shows the new hostname", T, || lab.cli_json(0, &["node", "ls"]).ok()?.as_array()?.iter().any(|n| n["id"] == id.as_str() && n["hostname"] == "snx-ident-renamed").then_some(()))?;
    scale_and_wait(&lab, 1, &vip, 4)?;
    assert_all_reach("after a hostname change and a scale-down", &client.round()?, &["web.1", "web.2", "web.3", "web.4"]);
    assert_root_programs("after a hostname change: nothing attached twice")?;
    assert_eq!(links_on(&lab, 1, &root)?, 4);
    assert!(lab.log(1).contains("programs_adopted=4"), "the restarted daemon adopted the programs");

    // 2. The layout before issue 19: the folders named after the hostname.
    lab.stop_node(1, libc::SIGKILL)?;
    rebuild_old_layout(&lab, 1)?;
    assert!(task_cgroups(&lab, 1).iter().all(|c| c.ends_with("/snx-ident-renamed")), "the old layout holds the tasks: {:?}", task_cgroups(&lab, 1));
    lab.start_node(1)?;
    scale_and_wait(&lab, 1, &vip, 2)?;
    assert_all_reach("after the old layout was taken over and a scale-down", &client.round()?, &["web.1", "web.2"]);
    wait_for("the daemon taking the old layout over", T, || lab.log(1).contains("removed the folders of the old layout").then_some(()))?;
    let cgs = task_cgroups(&lab, 1);
    assert!(!cgs.is_empty() && cgs.iter().all(|c| c.ends_with(&format!("/{id}"))), "every task moved to the node's cgroup: {cgs:?}");
    let old_cgroup = cgroup.with_file_name("snx-ident-renamed");
    assert!(!old_cgroup.exists(), "the old cgroup is gone");
    assert!(!swarmnet_lab::lab_bpffs()?.join("swarmnet").join("snx-ident-renamed").exists(), "the old pins are gone");
    assert_root_programs("after the old layout was taken over")?;
    assert_eq!(links_on(&lab, 1, &root)?, 4, "node 2's links moved to the root");

    // 3. The underlay interface replaced while the daemon is away: the pinned entry link is
    // severed; the new daemon attaches a new one (before: "Link has been severed", and
    // every node fell back to nftables).
    lab.stop_node(1, libc::SIGKILL)?;
    let ul = format!("{}-ul", lab.name);
    let ns = lab.nodes[1].ns.clone();
    let addr = lab.nodes[1].addr.clone();
    in_ns(&ul, &["ip", "link", "del", "snv2"])?;
    in_ns(&ul, &["ip", "link", "add", "snv2", "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
    in_ns(&ul, &["ip", "link", "set", "snv2", "master", "snbr0", "up"])?;
    in_ns(&ns, &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    in_ns(&ns, &["ip", "link", "set", "eth0", "up"])?;
    lab.start_node(1)?;
    let entry = wait_for("node 2's lb ls", T, || {
        let t = lab.cli_json(1, &["lb", "ls"]).ok()?;
        t["ports"].as_array().is_some_and(|p| !p.is_empty()).then(|| t["mesh_entry"].as_str().unwrap_or_default().to_string())
    })?;
    assert_eq!(entry, "ebpf", "the entry attached afresh");
    assert!(lab.log(1).contains("the pinned entry link was not attached to the underlay interface: replaced"), "the severed link was replaced");
    let cl = lab.outside_client()?;
    let out = wait_for("the published port answering on node 2", T, || {
        let o = in_ns(&cl, &["python3", &script("ingress_client.py"), "tcp", &addr, "8080", "20"]).ok()?;
        let v: Value = serde_json::from_str(o.trim()).ok()?;
        (v["counts"].as_object()?.values().filter_map(Value::as_u64).sum::<u64>() == 20).then_some(v)
    })?;
    assert!(out["errors"].as_array().is_some_and(|e| e.is_empty()), "{out}");
    Ok(())
}

/// Two nodes of one hostname on one kernel (nodes in containers, a lab): each has its own
/// eBPF load balancer and entry (before: `pin link: File exists`, and a fallback to
/// nftables), their VIPs work; a daemon started with a copy of a running node's identity is
/// refused, naming the daemon that holds it.
#[test]
fn two_nodes_of_one_name_work_side_by_side_and_an_identity_runs_once() -> Result<()> {
    let lab = Lab::up_same_hostname("snx-twins", 3, 2, 1.0, "twin")?;
    lab.cli_ok(0, &["network", "create", "--attachable", "appnet"])?;
    lab.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "2", "--network", "appnet", "--", "python3", &script("lb_server.py"), PORT])?;
    lab.wait_service("web", 2, T)?;
    let nodes = lab.cli_json(0, &["node", "ls"])?;
    assert_eq!(nodes.as_array().map(|a| a.iter().filter(|n| n["hostname"] == "twin").count()), Some(2), "{nodes}");
    let vip = vip(&lab)?;
    for i in 0..2 {
        let t = lab.cli_json(i, &["lb", "ls"])?;
        assert_eq!(t["backend"], "ebpf", "node {}: {t}", i + 1);
        assert_eq!(t["mesh_entry"], "ebpf", "node {}: {t}", i + 1);
        assert!(t["warning"].is_null(), "node {}: {t}", i + 1);
        let mut c = VipClient { dir: tempdir(&format!("snx-twins-c{i}"))?, round: 0 };
        let d = c.dir.display().to_string();
        lab.cli_ok(i, &["run", "--detach", "--name", &format!("c{i}"), "--network", "appnet", "--", "python3", &script("lb_client.py"), "on-demand", &vip, PORT, "30", &d])?;
        assert_all_reach(&format!("from node {}", i + 1), &c.round()?, &["web.1", "web.2"]);
    }
    assert!(!lab.log(0).contains("File exists") && !lab.log(1).contains("File exists"), "no pin collided");

    // A copy of node 2's data dir, started on node 3's host while node 2 runs.
    let copy = lab.nodes[2].data_dir.join("copy");
    std::fs::create_dir_all(copy.join("node"))?;
    std::fs::copy(lab.nodes[1].data_dir.join("node").join("identity.json"), copy.join("node").join("identity.json"))?;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.nodes[2].ns])
        .arg(&lab.bin)
        .args(["agent", "--join", &format!("{}:2377", lab.nodes[0].addr), "--advertise-addr", &lab.nodes[2].addr, "--bpffs"])
        .arg(swarmnet_lab::lab_bpffs()?)
        .arg("--data-dir")
        .arg(&copy)
        .env("SWARMNET_LAB", &lab.name)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second daemon with node 2's identity must not start: {err}");
    let pid = lab.daemon_pid(1).context("node 2's daemon")?;
    let want = format!("node {} is already run on this machine by another swarmnet daemon (pid {pid}, data dir {})", lab.node_id(1)?, lab.nodes[1].data_dir.display());
    assert!(err.contains(&want), "the refusal names the holder: {err}");
    assert!(lab.cli_json(0, &["node", "ls"])?.as_array().is_some_and(|a| a.iter().filter(|n| n["status"] == "ready").count() == 2), "node 2 is unharmed");
    Ok(())
}
