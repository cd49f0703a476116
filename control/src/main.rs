//! `swarmnet`: the daemons (composed of the manager's and the agent's crates) and the CLI.

mod cni;
mod converge;
mod daemon;
mod docker;
mod http;
mod logs;
mod memory;
mod metrics;
mod table;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde::de::DeserializeOwned;
use serde::Serialize;
use swarmnet_agent::dns::DnsOpts;
use swarmnet_agent::node::{LbMode, MeshEntry, NodeConfig};
use swarmnet_api::replies::*;
use swarmnet_api::{
    ApiError, ApiRequest, EndpointMode, NetworkAttach, NetworkCreate, PublishSpec, PublishedPort, Reply, Role, ServiceCreate, ServiceMode, ServiceUpdate, StandaloneCreate, UpdateConfig,
};
use swarmnet_types::Driver;

const DEFAULT_DATA_DIR: &str = "/var/lib/swarmnet";

#[derive(Parser)]
#[command(name = "swarmnet", version, about = "Swarm-style cluster networking: manager, agents and CLI")]
struct Cli {
    /// Daemon to talk to: unix:///path/to/control.sock (default: <data dir>/control.sock).
    #[arg(long, global = true, env = "SWARMNET_HOST")]
    host: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where a manager keeps the cluster's state.
#[derive(Args)]
struct StoreArgs {
    /// `redb` (the embedded store in the data directory: one manager) or
    /// `etcd://HOST:PORT[,HOST:PORT…]` (an etcd cluster: the state survives this machine).
    #[arg(long, default_value = "redb", value_parser = |s: &str| s.parse::<swarmnet_manager::store::StoreSpec>())]
    store: swarmnet_manager::store::StoreSpec,
    /// The prefix of the cluster's keys in etcd.
    #[arg(long, default_value = "/swarmnet")]
    store_prefix: String,
    /// CA certificate (PEM) etcd's server certificate is checked with; turns on TLS.
    #[arg(long)]
    store_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd, with --store-key.
    #[arg(long)]
    store_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd, with --store-cert.
    #[arg(long)]
    store_key: Option<PathBuf>,
    /// The leadership's lease in etcd: a manager that stops leads no more after it (2s to 60s).
    #[arg(long, default_value = "2s", value_parser = parse_span)]
    store_lease: Duration,
    /// Moves a one-manager cluster into etcd: the `manager.redb` it kept its state in (this
    /// node's, usually `<data-dir>/manager.redb`). The file is renamed `….imported` after.
    #[arg(long)]
    import: Option<PathBuf>,
}

impl StoreArgs {
    fn choice(self) -> anyhow::Result<swarmnet_manager::store::StoreChoice> {
        use swarmnet_manager::store::{EtcdConfig, EtcdTls, StoreChoice, StoreSpec};
        let etcd_only = self.store_prefix != "/swarmnet" || self.store_ca.is_some() || self.store_cert.is_some() || self.store_key.is_some() || self.import.is_some();
        match self.store {
            StoreSpec::Redb if etcd_only => bail!("--store-prefix, --store-ca, --store-cert, --store-key and --import are for --store etcd://…"),
            StoreSpec::Redb => Ok(StoreChoice::Redb),
            StoreSpec::Etcd { endpoints } => {
                if !self.store_prefix.starts_with('/') || self.store_prefix.len() < 2 {
                    bail!("--store-prefix {:?}: expected a path such as /swarmnet", self.store_prefix);
                }
                if !(2..=60).contains(&self.store_lease.as_secs()) || self.store_lease.subsec_nanos() != 0 {
                    bail!("--store-lease {:?}: expected whole seconds from 2s to 60s", self.store_lease);
                }
                if self.store_cert.is_some() != self.store_key.is_some() {
                    bail!("--store-cert and --store-key go together");
                }
                let mut c = EtcdConfig::new(endpoints, &self.store_prefix);
                c.import = self.import;
                c.lease_ttl = self.store_lease;
                if self.store_ca.is_some() || self.store_cert.is_some() {
                    c.tls = Some(EtcdTls { ca: self.store_ca, cert: self.store_cert, key: self.store_key });
                }
                Ok(StoreChoice::Etcd(c))
            }
        }
    }
}

#[derive(Args)]
struct DaemonArgs {
    /// This node's address on the underlay: other nodes reach it there.
    #[arg(long)]
    advertise_addr: IpAddr,
    /// Where the node keeps its identity, keys, task state and (a manager on the embedded
    /// store) the cluster's state.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// The node's name as `node ls` and `service ps` show it (default: the machine's
    /// hostname). Only a display name: the node's kernel objects are keyed by its id.
    #[arg(long)]
    hostname: Option<String>,
    /// Port of gossip (UDP and TCP); the same on every node.
    #[arg(long, default_value_t = 7946)]
    gossip_port: u16,
    /// Upstream resolver for names outside the cluster, IP or IP:PORT (repeatable; default:
    /// the nameservers of the node's resolv.conf).
    #[arg(long = "dns", value_name = "ADDR")]
    dns: Vec<String>,
    /// Search domain written into tasks' resolv.conf (repeatable; default: the node's;
    /// `.` for none).
    #[arg(long = "dns-search", value_name = "DOMAIN")]
    dns_search: Vec<String>,
    /// Option written into tasks' resolv.conf (repeatable; default: the node's).
    #[arg(long = "dns-option", value_name = "OPT")]
    dns_option: Vec<String>,
    /// How long a forwarded query may take, over all upstreams, before the task gets
    /// SERVFAIL (milliseconds).
    #[arg(long, default_value_t = 2000)]
    dns_timeout_ms: u64,
    /// TTL of the cluster's own DNS records (seconds).
    #[arg(long, default_value_t = 2)]
    dns_ttl: u32,
    /// The node's resolv.conf, read for upstreams, search domains and options.
    #[arg(long, default_value = "/etc/resolv.conf", hide = true)]
    resolv_conf: PathBuf,
    /// A bpffs mount to pin the load balancer's maps and links in, so they outlive the
    /// daemon (default: the first bpffs mounted, or /sys/fs/bpf mounted now).
    #[arg(long, value_name = "PATH")]
    bpffs: Option<PathBuf>,
    /// The service-VIP load balancer: eBPF at connect() (`ebpf`), nftables DNAT in each
    /// task's namespace (`nftables`), or eBPF if it loads, else nftables (`auto`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "ebpf", "nftables"])]
    lb: String,
    /// How clients from outside enter the routing mesh: an eBPF program on the underlay
    /// interface, replies straight from the task's node (`auto`: if it loads, else
    /// nftables), or the node's nftables table with replies back through the entry node
    /// (`nftables`: for an underlay that drops packets whose source is another host's).
    #[arg(long, default_value = "auto", value_parser = ["auto", "nftables"])]
    mesh_entry: String,
    /// How task output is kept, as Docker's `--log-opt`: `max-size=SIZE` (a file is rotated
    /// past it: 512k, 10m, 1g; default 10m) and `max-file=N` (files kept per task, the
    /// current one included; default 3). Repeatable.
    #[arg(long = "log-opt", value_name = "KEY=VALUE", value_parser = parse_log_opt)]
    log_opt: Vec<(String, u64)>,
    /// Serve the daemon's metrics (Prometheus's format) on http://ADDR:PORT/metrics, as
    /// dockerd's flag (9323 by convention). Off unless given.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_addr: Option<SocketAddr>,
    /// Serve the read-only Docker Engine API that Prometheus's dockerswarm_sd_configs and
    /// the docker CLI read (`node ls`, `service ls|ps`, `network ls`): unix:///PATH or
    /// tcp://ADDR:PORT (repeatable; no TLS: keep a TCP one on a trusted address). Off unless
    /// given.
    #[arg(long, value_name = "unix:///PATH|tcp://ADDR:PORT", value_parser = parse_api_endpoint)]
    docker_api: Vec<http::Endpoint>,
}

impl DaemonArgs {
    fn node_config(self) -> anyhow::Result<NodeConfig> {
        let upstreams = self.dns.iter().map(|s| swarmnet_dns::resolvconf::parse_upstream(s)).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
        if !(1..=60_000).contains(&self.dns_timeout_ms) {
            bail!("--dns-timeout-ms {}: expected 1 to 60000", self.dns_timeout_ms);
        }
        if self.dns_ttl > 3600 {
            bail!("--dns-ttl {}: expected 0 to 3600 seconds", self.dns_ttl);
        }
        Ok(NodeConfig {
            data_dir: self.data_dir,
            advertise: self.advertise_addr,
            gossip_port: self.gossip_port,
            holder_cmd: daemon::holder_cmd()?,
            metrics_addr: self.metrics_addr,
            docker_api: self.docker_api.iter().map(ToString::to_string).collect(),
            task_logs: {
                let mut l = swarmnet_agent::tasklog::LogConfig {
                    cmd: daemon::log_writer_cmd()?,
                    max_size: swarmnet_agent::tasklog::LogConfig::DEFAULT_MAX_SIZE,
                    max_files: swarmnet_agent::tasklog::LogConfig::DEFAULT_MAX_FILES,
                };
                for (k, v) in &self.log_opt {
                    match k.as_str() {
                        "max-size" => l.max_size = *v,
                        _ => l.max_files = u32::try_from(*v).unwrap_or(u32::MAX),
                    }
                }
                l
            },
            hostname: match self.hostname {
                Some(h) if h.trim().is_empty() || h.len() > 253 => bail!("--hostname {h:?}: expected 1 to 253 characters"),
                Some(h) => h,
                None => daemon::hostname(),
            },
            bpffs: self.bpffs,
            lb: match self.lb.as_str() {
                "ebpf" => LbMode::Ebpf,
                "nftables" => LbMode::Nftables,
                _ => LbMode::Auto,
            },
            mesh_entry: if self.mesh_entry == "nftables" { MeshEntry::Nftables } else { MeshEntry::Auto },
            dns: DnsOpts { upstreams, search: self.dns_search, options: self.dns_option, timeout: Duration::from_millis(self.dns_timeout_ms), ttl: self.dns_ttl, resolv_conf: self.resolv_conf },
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a manager (it also runs tasks, like a Docker manager node).
    Manager {
        #[command(flatten)]
        d: DaemonArgs,
        /// Where to listen for nodes and remote CLIs (default: 0.0.0.0:2377).
        #[arg(long, default_value = "0.0.0.0:2377")]
        listen_addr: SocketAddr,
        /// Pool that overlay subnets are taken from, a /24 each.
        #[arg(long, default_value = "10.0.0.0/8")]
        default_addr_pool: ipnetwork::Ipv4Network,
        /// Seconds between node heartbeats; a node is down after 3 missed.
        #[arg(long, default_value_t = 5.0)]
        heartbeat_interval: f64,
        /// UDP port of the VXLAN data path for the whole cluster (used when the cluster is
        /// created, like `docker swarm init --data-path-port`).
        #[arg(long, default_value_t = 4789)]
        data_path_port: u16,
        /// Subnet of the ingress network (the routing mesh's overlay), used when the cluster is
        /// created (default: the last /24 of --default-addr-pool, never handed to another network).
        #[arg(long)]
        ingress_subnet: Option<ipnetwork::Ipv4Network>,
        /// How often the manager replaces the gossip key: 12h, 30m, 90s (at least 10s).
        #[arg(long, default_value = "12h", value_parser = parse_duration)]
        gossip_key_rotation: Duration,
        /// Start over when the manager's store is damaged, empty or lost: set it aside and
        /// make a new cluster (every other node must join again). Without it such a store
        /// stops the manager with an error.
        #[arg(long)]
        force_new_cluster: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Run an agent that joins a manager.
    Agent {
        #[command(flatten)]
        d: DaemonArgs,
        /// The manager, HOST:PORT.
        #[arg(long)]
        join: String,
        /// The join token (needed only the first time: the node keeps its identity).
        #[arg(long)]
        token: Option<String>,
    },
    /// Internal: holds an overlay sandbox namespace open (started by the daemon).
    #[command(hide = true)]
    SandboxHold,
    /// Internal: stores a task's output, stamped and rotated (started by the daemon with
    /// each task: its stdout on fd 0, its stderr on fd 3).
    #[command(hide = true)]
    TaskLog {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        max_size: u64,
        #[arg(long)]
        max_files: u32,
    },
    /// Print the command and token to join a worker.
    JoinToken {
        /// worker (manager tokens come with several managers).
        #[arg(default_value = "worker", value_parser = parse_api::<Role>)]
        role: Role,
        /// Print only the token.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Nodes of the cluster: list, inspect, promote, demote, remove (manager).
    #[command(subcommand)]
    Node(NodeCmd),
    /// This node's load balancer.
    #[command(subcommand)]
    Lb(LbCmd),
    /// The cluster itself (manager).
    #[command(subcommand)]
    Swarm(SwarmCmd),
    /// Overlay networks: create, list, inspect, remove (manager).
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Services: create, list, list tasks, inspect, scale, update, remove (manager).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Run a command inside a task of this node: in its network and mount namespaces and its
    /// cgroup, so the cluster's DNS, the VIPs and the routing mesh answer it as they answer
    /// the task (`docker exec`). Exits with the command's exit code.
    #[command(after_help = "Examples:\n  swarmnet exec web.1 -- getent hosts web\n  swarmnet exec web.1 -- curl -s http://web/")]
    Exec {
        /// The task: its name (web.1), its id, or a unique prefix of its id.
        task: String,
        /// The command to run, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Run a standalone task on this node, attached to an attachable network.
    Run {
        /// The task's name (unique on the node while it runs).
        #[arg(long)]
        name: String,
        /// NAME, or name=NAME,alias=ALIAS (repeatable).
        #[arg(long, required = true, value_parser = parse_api::<NetworkAttach>)]
        network: Vec<NetworkAttach>,
        /// Return once it runs, instead of waiting for it to finish.
        #[arg(short, long)]
        detach: bool,
        /// The command to run, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// The CNI plugin: containers of other runtimes (containerd, CRI-O, podman, Nomad) on
    /// swarmnet's attachable networks. A runtime runs this binary with CNI_COMMAND set.
    #[command(subcommand)]
    Cni(CniCmd),
}

#[derive(Subcommand)]
enum CniCmd {
    /// Put the plugin binary (as `swarmnet`, the conf's type) into the runtime's plugin
    /// folder and write a conflist for each attachable network (or the one named).
    #[command(after_help = "Examples:\n  swarmnet cni install\n  swarmnet cni install --network appnet --conf-dir /etc/cni/net.d")]
    Install {
        /// Where the runtime looks for plugin binaries.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// Where the runtime reads network confs.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// Only this network (it must be attachable).
        #[arg(long)]
        network: Option<String>,
    },
}

/// Whether and how long a change waits for the service to converge.
#[derive(Args)]
struct Wait {
    /// Return at once, without waiting for the tasks to run.
    #[arg(short, long)]
    detach: bool,
    /// How long to wait for the service to converge before failing (exit 9; the change
    /// stays made).
    #[arg(long, default_value = "60s", value_parser = parse_span)]
    timeout: Duration,
}

impl Wait {
    fn converge(&self, host: &Option<String>, s: &ServiceInfo) -> Result<(), ApiError> {
        if self.detach {
            return Ok(());
        }
        let update = s.update_status.as_ref().is_some_and(|u| u.state == swarmnet_api::UpdateState::Updating);
        converge::wait(&|req| call::<serde_json::Value>(host, req), &s.id, self.timeout, update)
    }
}

#[derive(Args)]
struct Format {
    /// `table`, or `json` for a JSON array.
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    format: String,
}

impl Format {
    fn print<T: table::Row + Serialize>(&self, rows: &[T]) -> anyhow::Result<()> {
        if self.format == "json" {
            print_json(&rows)
        } else {
            print!("{}", table::render(rows));
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum SwarmCmd {
    /// Replace the gossip key now: every node gets the new one, then seals with it; the one
    /// before stays accepted until the next rotation.
    RotateGossipKey,
    /// Take this node out of the swarm: its tasks stop (draining first, then rescheduled
    /// elsewhere by the manager), every kernel object it made goes (namespaces, links,
    /// nftables tables, eBPF programs and pins, its cgroup), its data dir is emptied and its
    /// daemon exits. The node shows as down in `node ls` until `node rm`.
    Leave {
        /// Leave even though this node is a manager (the last manager's leave ends the
        /// cluster; demote a manager first instead).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum LbCmd {
    /// VIPs, their backends and the connections handed to each, read back from this node's
    /// kernel.
    Ls {
        #[command(flatten)]
        f: Format,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Every node: id, hostname, address, status, availability, manager status, gossip.
    Ls {
        #[command(flatten)]
        f: Format,
    },
    /// Remove a node from the cluster: its certificate is refused from now on and the
    /// gossip key is replaced without it. Refused for a node that is up, unless --force.
    Rm {
        /// The node's hostname or id.
        node: String,
        /// Remove it even though it is up.
        #[arg(long)]
        force: bool,
    },
    /// Make a manager a worker: it stops campaigning for the leadership (refused for the
    /// last manager). Remove it afterwards with `node rm`, or run it as `swarmnet agent`.
    Demote {
        /// The node's hostname or id.
        node: String,
    },
    /// Change a node's availability or labels: `drain` moves its service tasks to other nodes
    /// (the load balancer drains them first), `pause` places no new task on it.
    Update {
        /// The node's hostname or id.
        node: String,
        /// active, pause or drain.
        #[arg(long, value_parser = parse_api::<Availability>)]
        availability: Option<Availability>,
        /// A label to add or change, KEY=VALUE (repeatable); constraints match them.
        #[arg(long, value_parser = parse_label)]
        label_add: Vec<(String, String)>,
        /// A label to remove, KEY (repeatable).
        #[arg(long)]
        label_rm: Vec<String>,
    },
    /// Make a demoted manager a manager again. Only a node whose daemon runs `swarmnet
    /// manager` on the cluster's etcd can lead; a worker started as `swarmnet agent` becomes
    /// a manager by starting it as `swarmnet manager --store etcd://…` instead.
    Promote {
        /// The node's hostname or id.
        node: String,
    },
    /// One node as JSON: its status, and for a manager its address and the cluster's store.
    Inspect {
        /// The node's hostname or id.
        node: String,
    },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create an overlay network (a VXLAN segment with a subnet of its own).
    Create {
        /// Only overlay is built.
        #[arg(short, long, default_value = "overlay", value_parser = parse_driver)]
        driver: Driver,
        /// Standalone tasks (`swarmnet run`) may join it, not only services' tasks.
        #[arg(long)]
        attachable: bool,
        /// The network's subnet, CIDR (default: the next free /24 of the pool).
        #[arg(long, value_parser = parse_subnet)]
        subnet: Option<ipnetwork::Ipv4Network>,
        /// Make this the cluster's ingress network (the routing mesh's), in place of a removed one.
        #[arg(long)]
        ingress: bool,
        /// The network's name.
        name: String,
    },
    /// Every network: id, name, driver, scope, subnet, VNI, attachable.
    Ls {
        #[command(flatten)]
        f: Format,
    },
    /// One network as JSON, with this node's view of its endpoints.
    Inspect {
        /// The network's name or id.
        name: String,
    },
    /// Remove a network no service uses.
    Rm {
        /// The network's name or id.
        name: String,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Create a service: tasks spread over the nodes, a VIP (or DNS round robin) on each of
    /// its networks, its ports published on every node.
    #[command(after_help = SERVICE_CREATE_EXAMPLES)]
    Create {
        /// The service's name: its DNS name on its networks (tasks.NAME for its tasks).
        #[arg(long)]
        name: String,
        /// Tasks of a replicated service (default 1).
        #[arg(long, allow_negative_numbers = true, value_parser = parse_replicas)]
        replicas: Option<u64>,
        /// `replicated` (--replicas tasks) or `global` (one task on every node).
        #[arg(long, value_enum, default_value_t = ModeArg::Replicated)]
        mode: ModeArg,
        /// NAME, or name=NAME,alias=ALIAS (repeatable).
        #[arg(long, value_parser = parse_api::<NetworkAttach>)]
        network: Vec<NetworkAttach>,
        /// `vip`: the name answers one virtual IP, connections spread over the tasks;
        /// `dnsrr`: the name answers every task's address.
        #[arg(long, value_enum, default_value_t = EndpointModeArg::Vip)]
        endpoint_mode: EndpointModeArg,
        /// PUBLISHED:TARGET[/tcp|/udp], TARGET (published port from 30000-32767), or
        /// published=P,target=T,protocol=tcp|udp,mode=ingress|host
        #[arg(short, long, value_parser = parse_api::<PublishSpec>)]
        publish: Vec<PublishSpec>,
        /// Where its tasks may run: node.labels.KEY==VALUE, node.hostname==NAME, node.id==ID,
        /// node.role==manager|worker, or != for any (repeatable: all must hold).
        #[arg(long, value_parser = parse_api::<swarmnet_api::Constraint>)]
        constraint: Vec<swarmnet_api::Constraint>,
        /// A label of the service, KEY=VALUE (repeatable).
        #[arg(long, value_parser = parse_label)]
        label: Vec<(String, String)>,
        /// An environment variable of its tasks, KEY=VALUE (repeatable).
        #[arg(short, long, value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Tasks replaced at a time by a later `service update` (0: all at once).
        #[arg(long, default_value_t = 1)]
        update_parallelism: u64,
        /// Time between two tasks replaced by a later `service update` (e.g. 10s).
        #[arg(long, default_value = "0s", value_parser = parse_span)]
        update_delay: Duration,
        #[command(flatten)]
        wait: Wait,
        /// The tasks' command, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Every service: id, name, mode, replicas (running/desired), endpoint mode, ports.
    Ls {
        #[command(flatten)]
        f: Format,
    },
    /// A service's tasks: node, desired and current state, addresses, error.
    Ps {
        /// The service's name or id.
        name: String,
        #[command(flatten)]
        f: Format,
    },
    /// The output of a service's tasks (or of one task), from every node, each line
    /// prefixed with its task and node as `web.1.<task id>@<node> | `; stderr lines go to
    /// stderr. A node keeps each task's output in files of `--log-opt max-size`, rotated.
    #[command(after_help = SERVICE_LOGS_EXAMPLES)]
    Logs {
        /// A service (name or id), or a task (id, unique id prefix, or name such as web.1).
        target: String,
        /// Keep printing new lines as they are written, until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines of each task (`all`: everything).
        #[arg(short = 'n', long, default_value = "all", value_parser = parse_tail)]
        tail: Tail,
        /// Only lines written since a time: a duration ago (90s, 10m, 2h) or an RFC 3339
        /// time (2026-12-06T15:00:00Z).
        #[arg(long, value_parser = parse_since)]
        since: Option<u64>,
        /// Show each line's time (RFC 3339, ns) after its prefix.
        #[arg(short, long)]
        timestamps: bool,
        /// Leave the task id out of the prefix (`web.1@node | `).
        #[arg(long)]
        no_task_ids: bool,
        /// The lines alone, without a prefix.
        #[arg(long)]
        raw: bool,
    },
    /// One service as JSON: its spec, VIPs and published ports.
    Inspect {
        /// The service's name or id.
        name: String,
    },
    /// Change a replicated service's number of tasks.
    Scale {
        /// SERVICE=REPLICAS, for example web=5.
        spec: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Change a service. A new command, environment or constraints (or --force) replace its
    /// tasks as a rolling update: each new task runs and listens before the one it replaces
    /// drains and stops, --update-parallelism at a time, --update-delay apart; a new task
    /// that fails pauses the update, the old ones running on. Replicas, labels and
    /// published ports change without replacing the tasks.
    #[command(after_help = SERVICE_UPDATE_EXAMPLES)]
    Update {
        /// The service's name or id.
        name: String,
        /// A port to publish, as `service create --publish`.
        #[arg(long, value_parser = parse_api::<PublishSpec>)]
        publish_add: Vec<PublishSpec>,
        /// A published port to withdraw: PUBLISHED[/tcp|/udp].
        #[arg(long, value_parser = parse_api::<PublishedPort>)]
        publish_rm: Vec<PublishedPort>,
        /// Tasks of a replicated service.
        #[arg(long, allow_negative_numbers = true, value_parser = parse_replicas)]
        replicas: Option<u64>,
        /// An environment variable to add or change, KEY=VALUE (repeatable).
        #[arg(long, value_parser = parse_env)]
        env_add: Vec<(String, String)>,
        /// An environment variable to remove, KEY (repeatable).
        #[arg(long)]
        env_rm: Vec<String>,
        /// A placement constraint to add, as `service create --constraint` (repeatable).
        #[arg(long, value_parser = parse_api::<swarmnet_api::Constraint>)]
        constraint_add: Vec<swarmnet_api::Constraint>,
        /// A placement constraint to remove, as it was given (repeatable).
        #[arg(long, value_parser = parse_api::<swarmnet_api::Constraint>)]
        constraint_rm: Vec<swarmnet_api::Constraint>,
        /// A label to add or change, KEY=VALUE (repeatable).
        #[arg(long, value_parser = parse_label)]
        label_add: Vec<(String, String)>,
        /// A label to remove, KEY (repeatable).
        #[arg(long)]
        label_rm: Vec<String>,
        /// Tasks replaced at a time (0: all at once).
        #[arg(long)]
        update_parallelism: Option<u64>,
        /// Time between two tasks replaced (e.g. 10s).
        #[arg(long, value_parser = parse_span)]
        update_delay: Option<Duration>,
        /// Replace the tasks even if nothing else changes.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: Wait,
        /// A new command for its tasks, after `--`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Remove a service: its tasks stop (draining first), its VIPs and ports go.
    Rm {
        /// The service's name or id.
        name: String,
    },
}

const SERVICE_UPDATE_EXAMPLES: &str = "Examples:
  # A new command, one task at a time, 5 s apart; the VIP answers all along:
  swarmnet service update web --update-parallelism 1 --update-delay 5s -- python3 -m http.server 81

  # An environment variable and a constraint (a rolling update), a label (none):
  swarmnet service update web --env-add LOG=debug --constraint-add node.labels.zone==a --label-add tier=front

  # Restart every task, two at a time, without changing anything:
  swarmnet service update web --force --update-parallelism 2
";

const SERVICE_LOGS_EXAMPLES: &str = "Examples:
  # Everything every task of web wrote, then what they write next:
  swarmnet service logs -f web

  # The last 20 lines of each task, with their times:
  swarmnet service logs --tail 20 -t web

  # One task, the last ten minutes:
  swarmnet service logs --since 10m web.2
";

const SERVICE_CREATE_EXAMPLES: &str = "Examples:
  # Three tasks of a web server on an overlay network, port 8080 published on every node:
  swarmnet network create --driver overlay appnet
  swarmnet service create --name web --replicas 3 --network appnet --publish 8080:80 -- python3 -m http.server 80

  # One task on every node, reached by DNS round robin (tasks.agent answers them all):
  swarmnet service create --name agent --mode global --endpoint-mode dnsrr --network appnet -- sleep infinity

  # A UDP port published only on the nodes where a task runs (host mode):
  swarmnet service create --name dns --network appnet --publish published=5353,target=53,protocol=udp,mode=host -- ./server";

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ModeArg {
    Replicated,
    Global,
}

/// `--endpoint-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum EndpointModeArg {
    Vip,
    Dnsrr,
}

/// `--label KEY=VALUE`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    swarmnet_api::parse_label(s).map_err(|e| e.message)
}

/// `max-size=10m` (bytes: k, m, g suffixes, at least 4k) or `max-file=3` (1 to 32).
fn parse_log_opt(s: &str) -> Result<(String, u64), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected max-size=SIZE or max-file=N"))?;
    match k {
        "max-size" => {
            let (num, mult) = match v.to_ascii_lowercase().chars().last() {
                Some('k') => (&v[..v.len() - 1], 1u64 << 10),
                Some('m') => (&v[..v.len() - 1], 1 << 20),
                Some('g') => (&v[..v.len() - 1], 1 << 30),
                _ => (v, 1),
            };
            let n: u64 = num.parse().map_err(|_| format!("max-size={v}: expected a size such as 512k, 10m or 1g"))?;
            let bytes = n.checked_mul(mult).filter(|b| *b >= 4096).ok_or_else(|| format!("max-size={v}: expected at least 4k"))?;
            Ok((k.into(), bytes))
        }
        "max-file" => match v.parse::<u64>() {
            Ok(n @ 1..=32) => Ok((k.into(), n)),
            _ => Err(format!("max-file={v}: expected 1 to 32")),
        },
        _ => Err(format!("{k:?}: unknown log option (max-size, max-file)")),
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    swarmnet_api::parse_env(s).map_err(|e| e.message)
}

/// A value the API parses itself (`FromStr` with an `ApiError`), as a clap value parser.
fn parse_api<T: std::str::FromStr<Err = ApiError>>(s: &str) -> Result<T, String> {
    s.parse().map_err(|e: ApiError| e.message)
}

fn parse_driver(s: &str) -> Result<Driver, String> {
    s.parse()
}

fn parse_subnet(s: &str) -> Result<ipnetwork::Ipv4Network, String> {
    s.parse().map_err(|e| format!("invalid --subnet {s:?}: {e}"))
}

fn parse_replicas(s: &str) -> Result<u64, String> {
    match s.parse::<i64>() {
        Ok(n) if n < 0 => Err(format!("{n}: must be 0 or more")),
        _ => s.parse().map_err(|_| format!("{s:?} is not a number of replicas")),
    }
}

/// `SERVICE=REPLICAS`.
fn parse_scale(spec: &str) -> Result<(String, u64), ApiError> {
    let (name, n) = spec.split_once('=').ok_or_else(|| ApiError::invalid(format!("invalid scale {spec:?}: expected SERVICE=REPLICAS")))?;
    let replicas = parse_replicas(n).map_err(|e| ApiError::invalid(format!("invalid scale {spec:?}: {e}")))?;
    Ok((name.to_string(), replicas))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hickory_server=warn,hickory_proto=warn,hickory_net=warn"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).with_env_filter(filter).init();
}

fn main() -> ExitCode {
    // Run by a container runtime as its CNI plugin (issue 22).
    if cni::invoked_as_plugin() {
        return cni::plugin_main();
    }
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            // Each kind of refusal exits with a code of its own (README, "Exit codes").
            ExitCode::from(e.downcast_ref::<ApiError>().map_or(1, |a| a.kind.exit_code()))
        }
    }
}

/// A daemon holds many sockets (sessions, streams, one resolver per task): it raises its
/// soft open-file limit to the hard one at start (issue 12).
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

fn daemon_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    raise_nofile_limit();
    memory::limit_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.spawn(memory::trim_every(memory::TRIM_EVERY));
    Ok(rt)
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let host = cli.host.clone();
    match cli.cmd {
        Cmd::Manager { d, listen_addr, default_addr_pool, heartbeat_interval, data_path_port, ingress_subnet, gossip_key_rotation, force_new_cluster, store } => {
            init_logging();
            if !(0.05..=3600.0).contains(&heartbeat_interval) {
                bail!("--heartbeat-interval {heartbeat_interval}: expected 0.05 to 3600 seconds");
            }
            if data_path_port == 0 {
                bail!("--data-path-port 0: choose a UDP port (default 4789)");
            }
            let store = store.choice()?;
            let c = d.node_config()?;
            daemon_runtime()?.block_on(daemon::run_manager(
                c,
                listen_addr,
                default_addr_pool,
                Duration::from_secs_f64(heartbeat_interval),
                data_path_port,
                ingress_subnet,
                gossip_key_rotation,
                force_new_cluster,
                store,
            ))?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Agent { d, join, token } => {
            init_logging();
            let c = d.node_config()?;
            daemon_runtime()?.block_on(daemon::run_agent(c, join, token))?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::TaskLog { file, max_size, max_files } => {
            swarmnet_agent::tasklog::write_until_closed(&file, max_size, max_files).with_context(|| format!("task log {}", file.display()))?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::SandboxHold => {
            // Blocks until killed; the namespace lives as long as this process.
            loop {
                std::thread::park();
            }
        }
        Cmd::JoinToken { role, quiet } => {
            let t: JoinTokenInfo = call(&host, ApiRequest::JoinToken { role })?;
            if quiet {
                println!("{}", t.token);
            } else {
                println!("To add a worker to this cluster, run on it:\n\n    swarmnet agent --join <manager address>:2377 --token {} --advertise-addr <its address>\n", t.token);
            }
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Node(NodeCmd::Ls { f }) => {
            let nodes: Vec<NodeInfo> = call(&host, ApiRequest::NodeLs)?;
            f.print(&nodes)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Node(NodeCmd::Inspect { node }) => {
            print_json(&call::<swarmnet_api::replies::NodeDetail>(&host, ApiRequest::NodeInspect { node })?)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Node(NodeCmd::Demote { node }) => {
            let r: Removed = call(&host, ApiRequest::NodeDemote { node })?;
            println!("{} demoted", r.name);
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Node(NodeCmd::Update { node, availability, label_add, label_rm }) => {
            if availability.is_none() && label_add.is_empty() && label_rm.is_empty() {
                return Err(ApiError::invalid("node update: nothing to change (--availability, --label-add, --label-rm)").into());
            }
            let n: NodeInfo = call(&host, ApiRequest::NodeUpdate { node, availability, label_add: label_add.into_iter().collect(), label_rm })?;
            println!("{}", n.hostname);
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Exec { task, command } => {
            let target: ExecTarget = call(&host, ApiRequest::ExecLocate { task })?;
            return exec_in(&target, &command);
        }
        Cmd::Node(NodeCmd::Promote { node }) => {
            let r: Removed = call(&host, ApiRequest::NodePromote { node })?;
            println!("{} promoted", r.name);
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Node(NodeCmd::Rm { node, force }) => {
            let r: Removed = call(&host, ApiRequest::NodeRm { node, force })?;
            println!("{}", r.name);
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Swarm(SwarmCmd::Leave { force }) => {
            let r: Left = call(&host, ApiRequest::SwarmLeave { force })?;
            println!("node {} left the swarm", r.node_id);
            for w in &r.left_behind {
                eprintln!("warning: left behind: {w}");
            }
            return Ok(if r.left_behind.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        Cmd::Swarm(SwarmCmd::RotateGossipKey) => {
            let r: GossipKeyRotated = call(&host, ApiRequest::RotateGossipKey)?;
            println!("gossip key {} is in use", r.key);
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Lb(LbCmd::Ls { f }) => {
            let t: LbTable = call(&host, ApiRequest::LbLs)?;
            if f.format == "json" {
                print_json(&t)?;
            } else {
                if let Some(w) = &t.warning {
                    println!("warning: {w}");
                }
                println!("backend: {}", t.backend.map_or_else(|| "none".to_string(), |b| b.to_string()));
                print!("{}", table::render(&table::lb_rows(&t)));
                if let Some(w) = &t.ports_warning {
                    println!("\nwarning: {w}");
                }
                println!("\npublished ports (routing mesh; clients from outside enter by {}):", t.mesh_entry);
                print!("{}", table::render(&table::port_rows(&t)));
            }
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Network(NetworkCmd::Ls { f }) => {
            let nets: Vec<NetworkInfo> = call(&host, ApiRequest::NetworkLs)?;
            f.print(&nets)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Service(ServiceCmd::Ls { f }) => {
            let svcs: Vec<ServiceInfo> = call(&host, ApiRequest::ServiceLs)?;
            f.print(&svcs)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Service(ServiceCmd::Logs { target, follow, tail, since, timestamps, no_task_ids, raw }) => {
            let spec = swarmnet_api::logs::LogsRequest { target, follow, tail: tail.0, since_ns: since };
            return logs::print(&host, spec, logs::Show { timestamps, task_ids: !no_task_ids, raw });
        }
        Cmd::Service(ServiceCmd::Ps { name, f }) => {
            let r: ServicePsReply = call(&host, ApiRequest::ServicePs { name })?;
            f.print(&r.tasks)?;
            // After the table (on stderr: `--format json` prints the tasks alone).
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Run { name, network, detach, command } => {
            let r: RunResult = call(&host, ApiRequest::RunLocal { spec: StandaloneCreate { name, networks: network, command }, detach })?;
            return Ok(match r {
                RunResult::Detached(t) => {
                    println!("{}", t.id);
                    ExitCode::SUCCESS
                }
                RunResult::Finished { output, exit_code, .. } => {
                    print!("{output}");
                    ExitCode::from(u8::try_from(exit_code).unwrap_or(1))
                }
            });
        }
        Cmd::Network(NetworkCmd::Create { driver, attachable, subnet, ingress, name }) => {
            let n: NetworkInfo = call(&host, ApiRequest::NetworkCreate { spec: NetworkCreate { name, driver, attachable, subnet, ingress } })?;
            println!("{}", n.id);
        }
        Cmd::Cni(CniCmd::Install { bin_dir, conf_dir, network }) => {
            for f in cni::install(&host, &bin_dir, &conf_dir, network.as_deref())? {
                println!("{}", f.display());
            }
        }
        Cmd::Network(NetworkCmd::Inspect { name }) => print_json(&call::<NetworkDetail>(&host, ApiRequest::NetworkInspect { name })?)?,
        Cmd::Network(NetworkCmd::Rm { name }) => println!("{}", call::<Removed>(&host, ApiRequest::NetworkRm { name })?.name),
        Cmd::Service(ServiceCmd::Create { name, replicas, mode, network, endpoint_mode, publish, constraint, label, env, update_parallelism, update_delay, wait, command }) => {
            let endpoint_mode = match endpoint_mode {
                EndpointModeArg::Vip => EndpointMode::Vip,
                EndpointModeArg::Dnsrr => EndpointMode::Dnsrr,
            };
            let mode = match (mode, replicas) {
                (ModeArg::Replicated, r) => ServiceMode::Replicated { replicas: r.unwrap_or(1) },
                (ModeArg::Global, None) => ServiceMode::Global,
                (ModeArg::Global, Some(_)) => return Err(ApiError::invalid("--replicas is for a replicated service; a global one runs a task on every node").into()),
            };
            let s: ServiceInfo = call(
                &host,
                ApiRequest::ServiceCreate {
                    spec: ServiceCreate {
                        name,
                        mode,
                        networks: network,
                        endpoint_mode,
                        publish,
                        command,
                        constraints: constraint,
                        labels: label.into_iter().collect(),
                        env: env.into_iter().collect(),
                        update: UpdateConfig { parallelism: update_parallelism, delay_ms: millis(update_delay) },
                    },
                },
            )?;
            println!("{}", s.id);
            wait.converge(&host, &s)?;
        }
        Cmd::Service(ServiceCmd::Inspect { name }) => print_json(&call::<ServiceInfo>(&host, ApiRequest::ServiceInspect { name })?)?,
        Cmd::Service(ServiceCmd::Scale { spec, wait }) => {
            let (name, replicas) = parse_scale(&spec)?;
            let s = call::<ServiceInfo>(&host, ApiRequest::ServiceScale { name, replicas })?;
            println!("{}", s.name);
            wait.converge(&host, &s)?;
        }
        Cmd::Service(ServiceCmd::Update {
            name,
            publish_add,
            publish_rm,
            replicas,
            env_add,
            env_rm,
            constraint_add,
            constraint_rm,
            label_add,
            label_rm,
            update_parallelism,
            update_delay,
            force,
            wait,
            command,
        }) => {
            let spec = ServiceUpdate {
                publish_add,
                publish_rm,
                replicas,
                command: (!command.is_empty()).then_some(command),
                env_add: env_add.into_iter().collect(),
                env_rm,
                constraint_add,
                constraint_rm,
                label_add: label_add.into_iter().collect(),
                label_rm,
                parallelism: update_parallelism,
                delay_ms: update_delay.map(millis),
                force,
            };
            if spec.is_empty() {
                return Err(ApiError::invalid(format!("service update {name}: nothing to change (see swarmnet service update --help)")).into());
            }
            let s = call::<ServiceInfo>(&host, ApiRequest::ServiceUpdate { name, spec: Box::new(spec) })?;
            println!("{}", s.name);
            wait.converge(&host, &s)?;
        }
        Cmd::Service(ServiceCmd::Rm { name }) => println!("{}", call::<Removed>(&host, ApiRequest::ServiceRm { name })?.name),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn socket_path(host: &Option<String>) -> Result<PathBuf, ApiError> {
    match host {
        None => Ok(daemon::control_socket(&PathBuf::from(DEFAULT_DATA_DIR))),
        Some(h) => match h.strip_prefix("unix://") {
            Some(p) => Ok(PathBuf::from(p)),
            None => Err(ApiError::invalid(format!("--host {h:?}: only unix:///path/to/control.sock is supported"))),
        },
    }
}

/// One request to the local daemon; its reply's data as `T`. Every failure is an
/// [`ApiError`] with its kind (a refusal keeps the daemon's; a daemon that cannot be
/// reached is `unavailable`; a reply of another shape is `internal`, never an empty field).
fn call<T: DeserializeOwned>(host: &Option<String>, req: ApiRequest) -> Result<T, ApiError> {
    let path = socket_path(host)?;
    let unreachable = |e: &dyn std::fmt::Display| ApiError::unavailable(format!("cannot reach the swarmnet daemon at {} (is it running? set --host or SWARMNET_HOST): {e}", path.display()));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| ApiError::internal(format!("tokio: {e}")))?;
    let reply: Reply = rt.block_on(async {
        let mut s = tokio::net::UnixStream::connect(&path).await.map_err(|e| unreachable(&e))?;
        swarmnet_api::write_msg(&mut s, &req).await.map_err(|e| unreachable(&e))?;
        swarmnet_api::read_msg(&mut s).await.map_err(|e| unreachable(&e))?.ok_or_else(|| ApiError::unavailable("the daemon closed the connection without answering"))
    })?;
    if let Some(why) = &reply.stale {
        eprintln!("warning: STALE: {why}");
    }
    reply.into_data().map_err(|e| e.into_api())
}

/// `exec`: runs `command` in the task's network, mount and UTS namespaces and its cgroup,
/// and exits with its exit code (128 + the signal that ended it).
fn exec_in(t: &ExecTarget, command: &[String]) -> anyhow::Result<ExitCode> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let open = |ns: &str| std::fs::File::open(format!("/proc/{}/ns/{ns}", t.pid)).map_err(|e| anyhow::anyhow!("task {}: cannot open its {ns} namespace (process {}): {e}", t.name, t.pid));
    let (net, mnt, uts) = (open("net")?, open("mnt")?, open("uts")?);
    // Its cgroup (where the node's socket load balancer is attached), found under this
    // process's own cgroup2 mount (the daemon's may be elsewhere).
    let cg = swarmnet_dataplane::lb::host::cgroup_of(t.pid).ok_or_else(|| anyhow::anyhow!("task {}: cannot find its cgroup (is cgroup2 mounted here?)", t.name))?;
    let cgroup = std::fs::OpenOptions::new().write(true).open(cg.join("cgroup.procs")).map_err(|e| anyhow::anyhow!("task {}: cannot join its cgroup {}: {e}", t.name, cg.display()))?;
    // The namespaces opened are the task's process's, not those of a process that took its
    // PID since the daemon answered.
    if swarmnet_dataplane::task::proc_start_time(t.pid) != Some(t.start_time) {
        bail!("task {}: its process ended meanwhile", t.name);
    }
    let Some((prog, args)) = command.split_first() else { bail!("exec: no command") };
    let fds = (net.as_raw_fd(), mnt.as_raw_fd(), uts.as_raw_fd(), cgroup.as_raw_fd());
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args);
    // SAFETY: the closure runs in the child between fork and exec; it only makes system
    // calls (write, setns) that are async-signal-safe, on file descriptors the parent opened
    // above and keeps open until spawn returns. It allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let (net, mnt, uts, cg) = fds;
            if libc::write(cg, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            for (fd, kind) in [(uts, libc::CLONE_NEWUTS), (net, libc::CLONE_NEWNET), (mnt, libc::CLONE_NEWNS)] {
                if libc::setns(fd, kind) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let status = cmd.status().map_err(|e| anyhow::anyhow!("exec {prog} in task {}: {e}", t.name))?;
    drop((net, mnt, uts, cgroup));
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// "12h", "30m", "90s" or plain seconds; at least 10 s.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_span(s)?;
    if d.as_secs() < 10 {
        return Err(format!("{s:?}: at least 10s"));
    }
    Ok(d)
}

/// "2s", "1m" or plain seconds.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `--tail`: a number of lines, or None for all.
#[derive(Clone, Copy, Debug)]
struct Tail(Option<u64>);

fn parse_api_endpoint(s: &str) -> Result<http::Endpoint, String> {
    s.parse()
}

/// `all`, or a number of lines.
fn parse_tail(s: &str) -> Result<Tail, String> {
    if s == "all" {
        return Ok(Tail(None));
    }
    s.parse().map(|n| Tail(Some(n))).map_err(|_| format!("{s:?}: expected a number of lines or `all`"))
}

/// A duration ago (`10m`, `1h30m`) or an RFC 3339 time, as unix ns.
fn parse_since(s: &str) -> Result<u64, String> {
    let t = match humantime::parse_duration(s) {
        Ok(ago) => std::time::SystemTime::now().checked_sub(ago).unwrap_or(std::time::UNIX_EPOCH),
        Err(_) => humantime::parse_rfc3339_weak(s).map_err(|e| format!("{s:?}: expected a duration such as 10m or an RFC 3339 time such as 2026-12-06T15:00:00Z ({e})"))?,
    };
    Ok(t.duration_since(std::time::UNIX_EPOCH).map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)).unwrap_or(0))
}

fn parse_span(s: &str) -> Result<Duration, String> {
    let (n, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = n.trim().parse().map_err(|_| format!("{s:?}: expected a number with s, m or h (e.g. 12h)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        u => return Err(format!("{s:?}: unknown unit {u:?} (s, m or h)")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_a_floor() {
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("5s").is_err_and(|e| e.contains("at least 10s")));
        assert!(parse_duration("3d").is_err_and(|e| e.contains("unknown unit")));
        assert!(parse_duration("h").is_err());
    }

    /// Every verb and every flag says what it is (`--help`), as docker's do; `service
    /// create --help` has examples.
    #[test]
    fn every_command_and_flag_has_help() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set() && c.get_name() != "help") {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("{p}: no description"));
                }
                for arg in sub.get_arguments().filter(|a| !a.is_hide_set() && !a.is_global_set()) {
                    let id = arg.get_id().as_str();
                    if id != "help" && id != "version" && arg.get_help().is_none() {
                        missing.push(format!("{p}: {id} has no help"));
                    }
                }
                walk(sub, &p, missing);
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "swarmnet", &mut missing);
        assert!(missing.is_empty(), "without help:\n{}", missing.join("\n"));
        let create = cmd.find_subcommand("service").and_then(|s| s.find_subcommand("create")).expect("service create");
        let examples = create.get_after_help().map(|h| h.to_string()).unwrap_or_default();
        assert!(examples.contains("Examples:") && examples.contains("swarmnet service create --name web"), "{examples}");
        // And every example parses.
        for line in examples.lines().map(str::trim).filter(|l| l.starts_with("swarmnet ")) {
            if let Err(e) = Cli::try_parse_from(line.split_whitespace()) {
                panic!("example {line:?} does not parse: {e}");
            }
        }
    }
}
