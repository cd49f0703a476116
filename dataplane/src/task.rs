//! A task's kernel state: its network namespace with one veth per network (the node end
//! stays in the node namespace for the overlay to plug into its bridge), and its process.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;

use crate::netns::{raw, NsError, NsWorker};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskNet {
    /// Name of the node end, `snt…` (at most 15 bytes).
    pub host_if: String,
    /// Name inside the task: `eth0`, `eth1`, …
    pub ifname: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// This network's gateway is the task's default route (the ingress network's, if the
    /// task is on it: its gateway is the node's own port; else the first network's).
    pub default_route: bool,
}

/// Node-end name for a task's `index`-th network: `snt` + 10 characters of the id + index.
pub fn host_if_name(task_id: &str, index: usize) -> String {
    let short: String = task_id.chars().take(10).collect();
    format!("snt{short}{}", index % 10)
}

/// Makes the task's namespace and plugs one veth per network into it; the network marked
/// `default_route` (else the first) gets the default route. On failure, removes what it made.
pub async fn setup_task_net(ns: &NsWorker, nets: Vec<TaskNet>) -> Result<File, NsError> {
    ns.run(move |ctx| -> Result<File, NsError> {
        let netns = ctx.new_netns()?;
        let tnl = ctx.netlink_in(&netns)?;
        let fd = raw(&netns);
        let result = ctx.block_on(async {
            tnl.configure_link("lo", None, None, None).await?;
            for n in &nets {
                let peer = format!("snp{}", &n.host_if[3..]);
                ctx.home().delete_link(&n.host_if).await?;
                ctx.home().delete_link(&peer).await?;
                ctx.home().create_veth(&n.host_if, &peer).await?;
                ctx.home().move_to_netns(&peer, fd).await?;
                ctx.home().configure_link(&n.host_if, None, None, Some(n.mtu)).await?;
                tnl.configure_link(&peer, Some(&n.ifname), Some(n.mac), Some(n.mtu)).await?;
                tnl.add_address(&n.ifname, n.address.into(), n.prefix).await?;
            }
            if let Some(first) = nets.iter().find(|n| n.default_route).or(nets.first()) {
                tnl.add_default_route_v4(&first.ifname, first.gateway).await?;
            }
            Ok::<(), crate::netlink::Error>(())
        });
        if let Err(e) = result {
            ctx.block_on(async {
                for n in &nets {
                    let _ = ctx.home().delete_link(&n.host_if).await;
                }
            });
            return Err(e.into());
        }
        Ok(netns)
    })
    .await?
}

/// Removes the node ends of a task's veths (the task ends go with them).
pub async fn teardown_task_net(ns: &NsWorker, host_ifs: Vec<String>) -> Result<(), NsError> {
    ns.run(move |ctx| -> Result<(), NsError> {
        ctx.block_on(async {
            for h in &host_ifs {
                ctx.home().delete_link(h).await?;
            }
            Ok::<(), crate::netlink::Error>(())
        })?;
        Ok(())
    })
    .await?
}

/// The MTU and name of the link holding `addr` in the node namespace, and every prefix on the node's
/// links (loopback excluded).
pub async fn underlay_facts(ns: &NsWorker, addr: std::net::IpAddr) -> Result<(Option<(u32, String)>, Vec<ipnetwork::IpNetwork>), NsError> {
    ns.run(move |ctx| -> Result<_, NsError> {
        ctx.block_on(async {
            let addrs = ctx.home().addresses().await?;
            let links = ctx.home().links().await?;
            let mtu = addrs.iter().find(|(_, n)| n.ip() == addr).and_then(|(idx, _)| links.iter().find(|l| l.index == *idx)).map(|l| (l.mtu, l.name.clone()));
            Ok::<_, crate::netlink::Error>((mtu, addrs.into_iter().map(|(_, n)| n).collect()))
        })
        .map_err(NsError::from)
    })
    .await?
}

/// Opens the task's resolver sockets (UDP and TCP on `addr`) inside its namespace.
pub async fn resolver_sockets(ns: &NsWorker, netns: &File, addr: std::net::SocketAddr) -> Result<(std::net::UdpSocket, std::net::TcpListener), NsError> {
    let netns = netns.try_clone()?;
    ns.run(move |ctx| ctx.sockets_in(&netns, addr)).await?
}

/// The write ends of a task's stdout and stderr pipes, and the process that stores what
/// comes out of them (issue 21).
pub struct TaskOutput {
    pub stdout: std::os::fd::OwnedFd,
    pub stderr: std::os::fd::OwnedFd,
    pub writer: tokio::process::Child,
}

/// Starts a task's log writer `argv` (`swarmnet task-log …`) on two new pipes: it reads the
/// task's stdout on its fd 0 and stderr on its fd 3, in a session of its own (a signal to
/// the task's group never reaches it; it outlives the daemon as the task does, and ends
/// when the task and every process that inherited its output have ended). With the
/// daemon's environment, which has none of a task's (`SWARMNET_TASK_ID`): it is never taken
/// for a task.
pub fn spawn_log_writer(argv: &[String], cgroup_procs: Option<&File>, stderr_log: &Path) -> std::io::Result<TaskOutput> {
    use std::os::fd::AsRawFd;
    let Some((prog, args)) = argv.split_first() else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty log writer command"));
    };
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // Above the standard fds (a daemon started with one of them closed gets a pipe there,
    // which the child's stdio set-up would overwrite before it moves it to fd 3).
    let err_r: std::os::fd::OwnedFd = nix::fcntl::fcntl(&err_r, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3)).map(|fd| {
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    })?;
    let err_fd = err_r.as_raw_fd();
    let cg = cgroup_procs.map(|f| f.as_raw_fd());
    // Its own complaints (a line it could not store) go beside the log.
    let complaints = std::fs::OpenOptions::new().create(true).append(true).open(stderr_log)?;
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args).stdin(std::process::Stdio::from(out_r)).stdout(std::process::Stdio::null()).stderr(complaints);
    // SAFETY: the closure runs in the child between fork and exec and only makes raw system
    // calls (write, dup2, fcntl, setsid) that are async-signal-safe; it allocates nothing.
    // `err_fd` (at 3 or above, so stdio's set-up never touches it) and the cgroup's fd `cg`
    // stay open until spawn returns (`err_r` is dropped after it; the caller holds the
    // cgroup file).
    unsafe {
        cmd.pre_exec(move || {
            // In the node's cgroup with its task: a stop of the daemon's own cgroup (a
            // service manager's) leaves it running, as it leaves the task.
            if let Some(cg) = cg {
                if libc::write(cg, c"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if err_fd == 3 {
                // Already there: only its close-on-exec flag must go.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(err_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let writer = tokio::process::Command::from(cmd).kill_on_drop(false).spawn()?;
    drop(err_r);
    Ok(TaskOutput { stdout: out_w, stderr: err_w, writer })
}

/// stdout and stderr both appended to the file `log` (a process whose output is not a
/// task's, such as a sandbox's holder).
pub fn output_to_file(log: &Path) -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    Ok((out.into(), err.into()))
}

/// Starts `argv` inside the namespace `netns`, in a mount namespace of its own and a new
/// session (so it outlives the daemon and a signal to its group reaches its children), with
/// `hostname` in a UTS namespace of its own if given (a task's short id, as Docker names a
/// container; its hosts file maps it, so resolving its own name needs no DNS), with
/// stdout and stderr on `stdout` and `stderr` (a log writer's pipes). Each `(file, target)` of `binds` is bind-mounted
/// over `target` in the task's mount namespace only (its resolv.conf and hosts). With
/// `cgroup_procs` (a cgroup's `cgroup.procs`, open for writing), the process joins that
/// cgroup before it runs anything.
pub fn spawn_in_netns(
    netns: &File,
    argv: &[String],
    (stdout, stderr): (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
    env: &[(String, String)],
    binds: &[(std::path::PathBuf, std::path::PathBuf)],
    cgroup_procs: Option<&File>,
    hostname: Option<&str>,
) -> std::io::Result<tokio::process::Child> {
    let Some((prog, args)) = argv.split_first() else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"));
    };
    let binds: Vec<(std::ffi::CString, std::ffi::CString)> = binds
        .iter()
        .map(|(f, t)| {
            use std::os::unix::ffi::OsStrExt;
            let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("path with a NUL byte: {}", p.display())));
            Ok((c(f)?, c(t)?))
        })
        .collect::<std::io::Result<_>>()?;
    let hostname = hostname.map(|h| h.as_bytes().to_vec());
    let fd = netns.as_raw_fd();
    let cg = cgroup_procs.map(|f| f.as_raw_fd());
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args).stdin(std::process::Stdio::null()).stdout(stdout).stderr(stderr).envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    // SAFETY: the closure runs in the child between fork and exec and only makes raw
    // system calls (write, setns, unshare, mount, sethostname, setsid) that are
    // async-signal-safe; it allocates nothing and touches no lock (the C strings of `binds`
    // and the bytes of `hostname` were made before the fork and are only read). `fd` stays open until exec (it is not closed by the
    // parent before spawn returns), and so does the cgroup.procs fd `cg`.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(cg) = cg {
                // "0": the writing process itself.
                if libc::write(cg, c"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let uts = if hostname.is_some() { libc::CLONE_NEWUTS } else { 0 };
            if libc::unshare(libc::CLONE_NEWNS | uts) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(h) = &hostname {
                if libc::sethostname(h.as_ptr().cast(), h.len()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Mounts made for the task (resolv.conf, hosts) must not leak back to the node.
            if libc::mount(std::ptr::null(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_SLAVE, std::ptr::null()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (file, target) in &binds {
                if libc::mount(file.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    tokio::process::Command::from(cmd).kill_on_drop(false).spawn()
}

/// Whether process `pid` is a task's log writer (`swarmnet task-log …`, [`spawn_log_writer`]).
pub fn is_log_writer(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"task-log".as_slice()))
}

/// The start time of a process (field 22 of /proc/PID/stat, clock ticks since boot), or
/// None if there is no such live process (a zombie counts as gone).
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The task processes of the node whose data dir is `data_dir` that are running now, found
/// without any state file: session leaders whose environment carries
/// `SWARMNET_NODE_DATA_DIR=<data_dir>` and `SWARMNET_TASK_ID=<id>` (every task gets both).
/// (task id, pid, start time). Used when `tasks/state.json` is corrupt, so that live tasks
/// are adopted instead of orphaned and started twice (issue 12).
pub fn find_task_processes(data_dir: &std::path::Path) -> Vec<(String, u32, u64)> {
    let want = format!("SWARMNET_NODE_DATA_DIR={}", data_dir.display());
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        if !vars.contains(&want.as_bytes()) {
            continue;
        }
        let Some(id) = vars.iter().find_map(|v| v.strip_prefix(b"SWARMNET_TASK_ID=")).and_then(|v| std::str::from_utf8(v).ok()) else { continue };
        // The task itself, not a child that inherited its environment.
        if session_of(pid) != Some(pid) {
            continue;
        }
        if let Some(start) = proc_start_time(pid) {
            out.push((id.to_string(), pid, start));
        }
    }
    out
}

/// The session id of a process (field 6 of /proc/PID/stat).
pub(crate) fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// Signals the process group led by `pid`.
pub fn signal_group(pid: u32, sig: nix::sys::signal::Signal) -> nix::Result<()> {
    let pgid = nix::unistd::Pid::from_raw(i32::try_from(pid).map_err(|_| nix::Error::EINVAL)?);
    nix::sys::signal::killpg(pgid, sig)
}

/// The network namespace of a live process.
pub fn netns_of(pid: u32) -> std::io::Result<File> {
    File::open(format!("/proc/{pid}/ns/net"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_if_names_fit_ifnamsiz() {
        let n = host_if_name("abcdefghijklmnopqrstuvwxy", 1);
        assert_eq!(n, "sntabcdefghij1");
        assert!(n.len() <= 15);
    }

    #[test]
    fn start_time_of_self_and_of_nothing() {
        assert!(proc_start_time(std::process::id()).is_some());
        assert!(proc_start_time(u32::MAX).is_none());
    }
}
