//! The node's side of service discovery: the flags, the record store every task's resolver
//! shares (kept in step with the endpoint table by `swarmnet_dns::sink::DnsSink` in the
//! follow loop), and for each task its resolver (sockets opened in its namespace, served
//! here) and its resolv.conf/hosts files.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use swarmnet_dataplane::netns::NsWorker;
use swarmnet_dns::forward::Forwarder;
use swarmnet_dns::resolvconf::{self, NodeResolv, RESOLVER_ADDR};
use swarmnet_dns::server::{self, Config, Listener, Shared};
use tracing::{info, warn};

/// The agent's DNS flags.
#[derive(Clone, Debug)]
pub struct DnsOpts {
    /// Upstreams; empty: the node's resolv.conf nameservers.
    pub upstreams: Vec<SocketAddr>,
    /// Search domains for tasks; empty: the node's.
    pub search: Vec<String>,
    /// resolv.conf options for tasks; empty: the node's.
    pub options: Vec<String>,
    pub timeout: Duration,
    pub ttl: u32,
    /// The node's resolv.conf (a flag for tests).
    pub resolv_conf: PathBuf,
}

pub struct NodeDns {
    pub shared: Arc<Shared>,
    /// What goes into every task's resolv.conf besides our nameserver.
    task_resolv: String,
    /// Its search domains and options (a container's CNI result carries them).
    search: Vec<String>,
    options: Vec<String>,
}

impl NodeDns {
    pub fn new(opts: &DnsOpts) -> anyhow::Result<NodeDns> {
        let node = match std::fs::read_to_string(&opts.resolv_conf) {
            Ok(t) => resolvconf::parse(&t),
            Err(e) => {
                warn!(path = %opts.resolv_conf.display(), error = %e, "cannot read the node's resolv.conf: no upstream unless --dns is given");
                NodeResolv::default()
            }
        };
        let upstreams = if opts.upstreams.is_empty() { node.nameservers.clone() } else { opts.upstreams.clone() };
        let task = NodeResolv {
            nameservers: vec![],
            search: if opts.search.is_empty() { node.search.clone() } else { opts.search.iter().filter(|s| s.as_str() != ".").cloned().collect() },
            options: if opts.options.is_empty() { node.options.clone() } else { opts.options.clone() },
        };
        info!(upstreams = ?upstreams, search = ?task.search, ttl = opts.ttl, timeout_ms = opts.timeout.as_millis() as u64, "embedded DNS");
        let shared = Shared::new(Config { ttl: opts.ttl, forwarder: Forwarder { upstreams, timeout: opts.timeout } }).context("start the DNS thread")?;
        Ok(NodeDns { shared, task_resolv: resolvconf::task_resolv_conf(&task), search: task.search.clone(), options: task.options.clone() })
    }

    /// The search domains and options a task's resolv.conf has.
    pub fn search_and_options(&self) -> (Vec<String>, Vec<String>) {
        (self.search.clone(), self.options.clone())
    }

    /// Opens the task's resolver in its namespace and serves it here.
    pub async fn serve_task(&self, ns: &NsWorker, netns: &std::fs::File, task: &str, scope: Vec<String>) -> anyhow::Result<Listener> {
        let addr = SocketAddr::new(IpAddr::V4(RESOLVER_ADDR), 53);
        let (udp, tcp) = swarmnet_dataplane::task::resolver_sockets(ns, netns, addr).await.with_context(|| format!("task {task}: open its resolver on {addr}"))?;
        server::serve(self.shared.clone(), scope, udp, tcp).with_context(|| format!("task {task}: serve its resolver"))
    }

    /// Writes the task's resolv.conf and hosts next to its log; returns the bind mounts
    /// that put them over /etc/resolv.conf and /etc/hosts in its mount namespace.
    pub fn task_files(&self, dir: &Path, task: &str, name: &str, addrs: &[std::net::Ipv4Addr]) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
        let resolv = dir.join(format!("{task}.resolv.conf"));
        let hosts = dir.join(format!("{task}.hosts"));
        let short = short_id(task);
        std::fs::write(&resolv, &self.task_resolv).with_context(|| format!("write {}", resolv.display()))?;
        std::fs::write(&hosts, resolvconf::task_hosts(name, &short, addrs)).with_context(|| format!("write {}", hosts.display()))?;
        Ok(vec![(resolv, PathBuf::from("/etc/resolv.conf")), (hosts, PathBuf::from("/etc/hosts"))])
    }

    pub fn remove_task_files(dir: &Path, task: &str) {
        for f in [format!("{task}.resolv.conf"), format!("{task}.hosts")] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
}

/// A task's hostname: the first 12 characters of its id (Docker's for a container), mapped
/// to its addresses in its hosts file.
pub fn short_id(task: &str) -> String {
    task.chars().take(12).collect()
}
