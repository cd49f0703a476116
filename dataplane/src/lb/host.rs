//! Where a node's eBPF state lives on the machine: a cgroup v2 folder of the node's own
//! (`<cgroup2>/swarmnet/<node id>`: its tasks run in it and the load balancer's programs are
//! attached to it, never to the root) and a bpffs folder for its pinned maps and links
//! (`<bpffs>/swarmnet/<node id>/lb-v1` and `ingress-v1`; the version names the maps'
//! layout). Both are keyed by the node's id, which never changes (issue 19): a new hostname,
//! or two nodes of one name on one kernel, change nothing. cgroup2 and bpffs are found in the
//! mount table, or mounted if absent.
//!
//! A node's id is claimed for the daemon's life ([`claim`]): a second daemon with the same
//! identity on this machine is refused, naming the one that holds it. Folders of the layout
//! before issue 19 (named after the hostname) are found through the node's own tasks and
//! taken over ([`Host::find_legacy`] and what follows it).

use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {fstype} at {path}: {source}")]
    Mount {
        fstype: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("node {node} is already run on this machine by another swarmnet daemon ({holder}): two daemons cannot share one node identity (a copied data dir?); stop that one, or join this one afresh with its own data dir")]
    Claimed { node: String, holder: String },
}

/// The layout of the pinned maps; a new layout gets a new folder.
pub const PIN_VERSION: &str = "lb-v1";
/// Top folder of everything swarmnet makes in cgroup2 and bpffs.
pub const TOP: &str = "swarmnet";

/// The layout of the routing mesh's entry's pinned maps (a sibling of [`PIN_VERSION`]).
pub const INGRESS_PIN_VERSION: &str = "ingress-v1";
/// Where daemons claim their node ids.
pub const CLAIMS: &str = "/run/swarmnet/nodes";

#[derive(Clone, Debug)]
pub struct Host {
    /// The node's cgroup folder.
    pub cgroup: PathBuf,
    /// Where the load balancer's programs are attached: the root of cgroup2, so that they
    /// act for every process of a namespace they translate for, whatever its cgroup (a
    /// container a CNI runtime made, an `nsenter`ed command; issue 22). Their gate is the
    /// socket's network namespace, never its cgroup.
    pub attach_to: PathBuf,
    /// The node's folder of the load balancer's pins (`<bpffs>/swarmnet/<node>/lb-v1`).
    pub pins: PathBuf,
    /// The node's folder of the routing mesh entry's pins (`.../ingress-v1`).
    pub ingress_pins: PathBuf,
}

/// A node id claimed by this daemon (released when dropped, or when the process ends).
#[derive(Debug)]
pub struct Claim {
    _lock: File,
}

/// Claims node `node` for this process: refused, naming the holder, while another live
/// daemon holds it (a lock file under [`CLAIMS`], held for the daemon's life; the kernel
/// drops it with the process, so a crashed daemon leaves nothing to clean).
pub fn claim(node: &str, data_dir: &Path) -> Result<Claim, HostError> {
    claim_in(Path::new(CLAIMS), node, data_dir)
}

fn claim_in(dir: &Path, node: &str, data_dir: &Path) -> Result<Claim, HostError> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).map_err(|source| HostError::Io { what: "create", path: dir.into(), source })?;
    let path = dir.join(format!("{}.lock", dir_name(node)));
    let io = |what: &'static str| {
        let path = path.clone();
        move |source| HostError::Io { what, path, source }
    };
    let mut f = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(io("open"))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "a daemon that has not said who it is yet".to_string() } else { holder.to_string() };
            return Err(HostError::Claimed { node: node.to_string(), holder });
        }
        return Err(io("lock")(e));
    }
    f.set_len(0).map_err(io("write"))?;
    f.rewind().map_err(io("write"))?;
    writeln!(f, "pid {}, data dir {}", std::process::id(), data_dir.display()).map_err(io("write"))?;
    Ok(Claim { _lock: f })
}

/// The layout before issue 19: a node's folders named after its hostname. Found through the
/// node's own tasks (their cgroup), never by a name: another node of the same name may use
/// a folder of that name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Legacy {
    /// `<cgroup2>/swarmnet/<hostname>`.
    pub cgroup: PathBuf,
    /// `<bpffs>/swarmnet/<hostname>`.
    pub pins: PathBuf,
    /// Processes in it that belong to this node's tasks (a task or a process of its session).
    pub ours: Vec<u32>,
    /// Processes in it that do not (another node's of the same name): if any, the folder and
    /// its pins are left alone, and only this node's processes move.
    pub foreign: usize,
}

/// The mount points of `fstype` in /proc/self/mountinfo, in mount order.
fn mounts(fstype: &str) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fs = right.split_whitespace().next()?;
            if fs != fstype {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .collect()
}

fn find_mount(fstype: &str) -> Option<PathBuf> {
    mounts(fstype).into_iter().next()
}

/// The cgroup (v2) process `pid` is in, as a path under this machine's cgroup2 mount.
pub fn cgroup_of(pid: u32) -> Option<PathBuf> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = s.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(find_mount("cgroup2")?.join(rel.trim_start_matches('/')))
}

/// Makes sure a bpffs is mounted at `path` (mounts one if not).
pub fn ensure_bpffs(path: &Path) -> Result<(), HostError> {
    if mounts("bpf").iter().any(|m| m == path) {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(|source| HostError::Io { what: "create", path: path.into(), source })?;
    nix::mount::mount(Some("bpf"), path, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>).map_err(|source| HostError::Mount { fstype: "bpf", path: path.into(), source })
}

fn ensure_mount(fstype: &'static str, fallback: &Path) -> Result<PathBuf, HostError> {
    if let Some(p) = find_mount(fstype) {
        return Ok(p);
    }
    std::fs::create_dir_all(fallback).map_err(|source| HostError::Io { what: "create", path: fallback.into(), source })?;
    nix::mount::mount(Some(fstype), fallback, Some(fstype), nix::mount::MsFlags::empty(), None::<&str>).map_err(|source| HostError::Mount { fstype, path: fallback.into(), source })?;
    Ok(fallback.to_path_buf())
}

/// A file-system-safe form of a node name.
pub fn dir_name(node: &str) -> String {
    node.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect()
}

impl Host {
    /// Finds (or mounts) cgroup2 and bpffs and makes the folders of node `node` (its id) in
    /// them. `bpffs`: a bpffs mount to use instead of the first one found (a daemon whose
    /// mount namespace is private, as under `ip netns exec`, needs one its namespace shares
    /// with the machine's, or its pins would die with it).
    pub fn prepare(node: &str, bpffs: Option<&Path>) -> Result<Host, HostError> {
        let cg2 = ensure_mount("cgroup2", Path::new("/run/swarmnet/cgroup2"))?;
        let bpffs = match bpffs {
            Some(p) => p.to_path_buf(),
            None => ensure_mount("bpf", Path::new("/sys/fs/bpf"))?,
        };
        let name = dir_name(node);
        let cgroup = cg2.join(TOP).join(&name);
        let root = bpffs.join(TOP).join(&name);
        let (pins, ingress_pins) = (root.join(PIN_VERSION), root.join(INGRESS_PIN_VERSION));
        for (what, p) in [("create cgroup", &cgroup), ("create bpffs folder", &pins), ("create bpffs folder", &ingress_pins)] {
            std::fs::create_dir_all(p).map_err(|source| HostError::Io { what, path: p.clone(), source })?;
        }
        Ok(Host { cgroup, attach_to: cg2, pins, ingress_pins })
    }

    /// The cgroup the programs are attached to, opened.
    pub fn attach_dir(&self) -> Result<File, HostError> {
        File::open(&self.attach_to).map_err(|source| HostError::Io { what: "open cgroup", path: self.attach_to.clone(), source })
    }

    /// `cgroup.procs` of the node's cgroup, open for writing: a task writes "0" to it
    /// between fork and exec to join it.
    pub fn cgroup_procs(&self) -> Result<File, HostError> {
        let p = self.cgroup.join("cgroup.procs");
        std::fs::OpenOptions::new().write(true).open(&p).map_err(|source| HostError::Io { what: "open", path: p, source })
    }

    /// The folder of the layout before issue 19 that this node's tasks (`tasks`: their pids)
    /// run in, if any: another folder under `<cgroup2>/swarmnet` than the node's own.
    pub fn find_legacy(&self, tasks: &[u32]) -> Option<Legacy> {
        let top = self.cgroup.parent()?;
        let bpffs_top = self.pins.parent()?.parent()?;
        let cg2 = top.parent()?;
        let mut found: Option<PathBuf> = None;
        for pid in tasks {
            let Some(rel) = cgroup2_of(*pid) else { continue };
            let p = cg2.join(rel.trim_start_matches('/'));
            if p != self.cgroup && p.parent() == Some(top) {
                found = Some(p);
                break;
            }
        }
        let cgroup = found?;
        let name = cgroup.file_name()?.to_owned();
        let (mut ours, mut foreign) = (Vec::new(), 0);
        for pid in procs_of(&cgroup) {
            // A task's process, one of its session, or a task's log writer (in the node's
            // cgroup with it, in a session of its own).
            if tasks.contains(&pid) || crate::task::session_of(pid).is_some_and(|s| tasks.contains(&s)) || crate::task::is_log_writer(pid) {
                ours.push(pid);
            } else {
                foreign += 1;
            }
        }
        Some(Legacy { cgroup, pins: bpffs_top.join(name), ours, foreign })
    }

    /// Takes over the pinned maps and links of a legacy folder that is this node's alone:
    /// they move into the node's own folders (a rename keeps every map's content, and every
    /// link attached as it is), unless the node has pins of its own already. Returns the
    /// folders moved.
    pub fn take_legacy_pins(&self, legacy: &Legacy) -> Result<Vec<PathBuf>, HostError> {
        let mut moved = Vec::new();
        if legacy.foreign > 0 {
            return Ok(moved);
        }
        for mine in [&self.pins, &self.ingress_pins] {
            let Some(v) = mine.file_name() else { continue };
            let old = legacy.pins.join(v);
            let empty = std::fs::read_dir(mine).map(|mut d| d.next().is_none()).unwrap_or(false);
            if !old.is_dir() || !empty {
                continue;
            }
            std::fs::remove_dir(mine).map_err(|source| HostError::Io { what: "replace", path: mine.clone(), source })?;
            std::fs::rename(&old, mine).map_err(|source| HostError::Io { what: "move pins to", path: mine.clone(), source })?;
            moved.push(mine.clone());
        }
        Ok(moved)
    }

    /// Moves this node's processes of a legacy folder into the node's cgroup (under the
    /// programs attached there). Returns how many moved.
    pub fn move_tasks(&self, legacy: &Legacy) -> Result<usize, HostError> {
        let procs = self.cgroup.join("cgroup.procs");
        let mut n = 0;
        for pid in &legacy.ours {
            match std::fs::write(&procs, pid.to_string()) {
                Ok(()) => n += 1,
                // Gone meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(source) => return Err(HostError::Io { what: "move a task's process into", path: procs, source }),
            }
        }
        Ok(n)
    }

    /// Removes a legacy folder that is this node's alone once nothing runs in it: the pins
    /// left in it are unpinned (their links detach, their maps go) and its cgroup goes.
    pub fn retire_legacy(&self, legacy: &Legacy) -> Result<bool, HostError> {
        if legacy.foreign > 0 || !procs_of(&legacy.cgroup).is_empty() {
            return Ok(false);
        }
        if legacy.pins.exists() {
            std::fs::remove_dir_all(&legacy.pins).map_err(|source| HostError::Io { what: "remove", path: legacy.pins.clone(), source })?;
        }
        std::fs::remove_dir(&legacy.cgroup).map_err(|source| HostError::Io { what: "remove", path: legacy.cgroup.clone(), source })?;
        Ok(true)
    }
}

/// The cgroup2 path of a process (the `0::` line of /proc/PID/cgroup).
fn cgroup2_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}

/// The processes of a cgroup.
fn procs_of(cgroup: &Path) -> Vec<u32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The cgroup folder of node `node` (its id), as this process sees cgroup2 (for tools and
/// tests).
pub fn node_cgroup(node: &str) -> Option<PathBuf> {
    Some(find_mount("cgroup2")?.join(TOP).join(dir_name(node)))
}

/// Removes what nodes `ids` left in cgroup2 and in every bpffs (the lab's clean-up, also
/// after a crash: it reads the ids from its nodes' data dirs). Their processes are killed
/// first (a cgroup with processes cannot go).
pub fn remove_nodes(ids: &[String]) -> Result<(), HostError> {
    for id in ids {
        let name = dir_name(id);
        remove_matching(|n| n == name)?;
        // The claim of a daemon that is gone (the lock went with it; the file stays).
        let _ = std::fs::remove_file(Path::new(CLAIMS).join(format!("{name}.lock")));
    }
    Ok(())
}

/// Removes what nodes named `<prefix>*` left in cgroup2 and bpffs (the lab's clean-up, also
/// after a crash). Their processes must be gone first (a cgroup with processes cannot go).
pub fn remove_leftovers(prefix: &str) -> Result<(), HostError> {
    remove_matching(|n| n.starts_with(prefix))
}

fn remove_matching(matches: impl Fn(&str) -> bool) -> Result<(), HostError> {
    let mut roots = Vec::new();
    if let Some(cg2) = find_mount("cgroup2").or_else(|| Some(PathBuf::from("/run/swarmnet/cgroup2"))) {
        roots.push((cg2.join(TOP), true));
    }
    for bpffs in mounts("bpf") {
        roots.push((bpffs.join(TOP), false));
    }
    for (root, cgroup) in roots {
        let Ok(rd) = std::fs::read_dir(&root) else { continue };
        for e in rd.flatten() {
            if !matches(&e.file_name().to_string_lossy()) {
                continue;
            }
            let p = e.path();
            // A cgroup folder is removed with rmdir (its files are not real files), once
            // every process in it is gone: a task that cleared its environment (nginx does)
            // escapes a clean-up that looks for its marker, not this one. A bpffs folder goes
            // by unlinking its pins.
            let r = if cgroup { kill_and_remove_cgroup(&p) } else { std::fs::remove_dir_all(&p) };
            r.map_err(|source| HostError::Io { what: "remove", path: p.clone(), source })?;
        }
    }
    Ok(())
}

/// Kills every process in cgroup `p` (`cgroup.kill`), waits for them to go, removes it.
fn kill_and_remove_cgroup(p: &Path) -> std::io::Result<()> {
    let procs = p.join("cgroup.procs");
    let busy = || std::fs::read_to_string(&procs).map(|s| !s.trim().is_empty()).unwrap_or(false);
    if busy() {
        std::fs::write(p.join("cgroup.kill"), b"1")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while busy() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    std::fs::remove_dir(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_for_paths() {
        assert_eq!(dir_name("snx-lb-n1"), "snx-lb-n1");
        assert_eq!(dir_name("a/b c"), "a_b_c");
    }

    #[test]
    fn a_node_id_is_claimed_by_one_daemon_at_a_time_and_the_refusal_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("sn-claims-{}", std::process::id()));
        let first = claim_in(&dir, "abc123", Path::new("/var/lib/a")).expect("first claim");
        let e = claim_in(&dir, "abc123", Path::new("/var/lib/b")).expect_err("second claim");
        let msg = e.to_string();
        assert!(msg.contains("node abc123 is already run") && msg.contains(&format!("pid {}, data dir /var/lib/a", std::process::id())), "{msg}");
        claim_in(&dir, "other", Path::new("/var/lib/b")).expect("another node");
        drop(first);
        claim_in(&dir, "abc123", Path::new("/var/lib/b")).expect("free again once the holder is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_proc_mount_is_found() {
        assert_eq!(find_mount("proc"), Some(PathBuf::from("/proc")));
        assert_eq!(find_mount("no-such-fs"), None);
    }
}
