//! Where the load balancer lives on the node: a cgroup v2 folder of the node's own
//! (`<cgroup2>/swarmnet/<node>`: its tasks run in it and the programs are attached to it,
//! never to the root, so nodes of a lab on one kernel never step on each other) and a bpffs
//! folder for its pinned maps and links (`<bpffs>/swarmnet/<node>/lb-v1`; the version names
//! the maps' layout). Both are found in the mount table, or mounted if absent.

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
}

/// The layout of the pinned maps; a new layout gets a new folder.
pub const PIN_VERSION: &str = "lb-v1";
/// Top folder of everything swarmnet makes in cgroup2 and bpffs.
pub const TOP: &str = "swarmnet";

#[derive(Clone, Debug)]
pub struct Host {
    /// The node's cgroup folder.
    pub cgroup: PathBuf,
    /// The node's folder of pins.
    pub pins: PathBuf,
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
    /// Finds (or mounts) cgroup2 and bpffs and makes the node's folders in them. `bpffs`:
    /// a bpffs mount to use instead of the first one found (a daemon whose mount namespace
    /// is private, as under `ip netns exec`, needs one its namespace shares with the
    /// machine's, or its pins would die with it).
    pub fn prepare(node: &str, bpffs: Option<&Path>) -> Result<Host, HostError> {
        let cg2 = ensure_mount("cgroup2", Path::new("/run/swarmnet/cgroup2"))?;
        let bpffs = match bpffs {
            Some(p) => p.to_path_buf(),
            None => ensure_mount("bpf", Path::new("/sys/fs/bpf"))?,
        };
        let name = dir_name(node);
        let cgroup = cg2.join(TOP).join(&name);
        let pins = bpffs.join(TOP).join(&name).join(PIN_VERSION);
        for (what, p) in [("create cgroup", &cgroup), ("create bpffs folder", &pins)] {
            std::fs::create_dir_all(p).map_err(|source| HostError::Io { what, path: p.clone(), source })?;
        }
        Ok(Host { cgroup, pins })
    }

    /// The node's cgroup folder, opened (what programs are attached to).
    pub fn cgroup_dir(&self) -> Result<File, HostError> {
        File::open(&self.cgroup).map_err(|source| HostError::Io { what: "open cgroup", path: self.cgroup.clone(), source })
    }

    /// `cgroup.procs` of the node's cgroup, open for writing: a task writes "0" to it
    /// between fork and exec to join it.
    pub fn cgroup_procs(&self) -> Result<File, HostError> {
        let p = self.cgroup.join("cgroup.procs");
        std::fs::OpenOptions::new().write(true).open(&p).map_err(|source| HostError::Io { what: "open", path: p, source })
    }
}

/// The cgroup folder of node `node`, as this process sees cgroup2 (for tools and tests).
pub fn node_cgroup(node: &str) -> Option<PathBuf> {
    Some(find_mount("cgroup2")?.join(TOP).join(dir_name(node)))
}

/// Removes what nodes named `<prefix>*` left in cgroup2 and bpffs (the lab's clean-up, also
/// after a crash). Their processes must be gone first (a cgroup with processes cannot go).
pub fn remove_leftovers(prefix: &str) -> Result<(), HostError> {
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
            if !e.file_name().to_string_lossy().starts_with(prefix) {
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
    fn the_proc_mount_is_found() {
        assert_eq!(find_mount("proc"), Some(PathBuf::from("/proc")));
        assert_eq!(find_mount("no-such-fs"), None);
    }
}
