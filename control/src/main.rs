//! `swarmnet`: the daemons (composed of the manager's and the agent's crates) and the CLI.

mod daemon;
mod sim;
mod table;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use serde::de::DeserializeOwned;
use serde::Serialize;
use swarmnet_agent::dns::DnsOpts;
use swarmnet_agent::node::{LbMode, MeshEntry, NodeConfig};
use swarmnet_api::replies::*;
use swarmnet_api::{ApiRequest, EndpointMode, NetworkCreate, Reply, ServiceCreate, StandaloneCreate};

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

#[derive(Args)]
struct DaemonArgs {
    /// This node's address on the underlay: other nodes reach it there.
    #[arg(long)]
    advertise_addr: IpAddr,
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
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
            node_name: daemon::node_name(),
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
    /// Benchmarks only: N simulated nodes that join and keep real sessions, and report
    /// every task they are given as running without starting anything.
    #[command(hide = true)]
    SimNodes {
        #[arg(long)]
        join: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        advertise_addr: IpAddr,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Benchmarks only: a gossip peer that publishes COUNT endpoints on a network.
    #[command(hide = true)]
    SimEndpoints {
        #[arg(long)]
        gossip_addr: SocketAddr,
        #[arg(long)]
        seed: SocketAddr,
        /// Network id.
        #[arg(long)]
        network: String,
        #[arg(long)]
        count: usize,
        /// Give each endpoint a VIP of its own (a service each: load-balancer benchmarks).
        #[arg(long)]
        vips: bool,
        /// The data dir of a node of the cluster: its gossip keys are used (gossip is sealed).
        #[arg(long)]
        keys_from: PathBuf,
    },
    /// Internal: holds an overlay sandbox namespace open (started by the daemon).
    #[command(hide = true)]
    SandboxHold,
    /// Print the command and token to join a worker.
    JoinToken {
        #[arg(default_value = "worker")]
        role: String,
        /// Print only the token.
        #[arg(short, long)]
        quiet: bool,
    },
    #[command(subcommand)]
    Node(NodeCmd),
    /// This node's load balancer.
    #[command(subcommand)]
    Lb(LbCmd),
    /// The cluster itself (manager).
    #[command(subcommand)]
    Swarm(SwarmCmd),
    #[command(subcommand)]
    Network(NetworkCmd),
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Run a standalone task on this node, attached to an attachable network.
    Run {
        #[arg(long)]
        name: String,
        #[arg(long, required = true)]
        network: Vec<String>,
        /// Return once it runs, instead of waiting for it to finish.
        #[arg(short, long)]
        detach: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
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
    Ls {
        #[command(flatten)]
        f: Format,
    },
    /// Remove a node from the cluster: its certificate is refused from now on and the
    /// gossip key is replaced without it. Refused for a node that is up, unless --force.
    Rm {
        node: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum NetworkCmd {
    Create {
        #[arg(short, long, default_value = "overlay")]
        driver: String,
        #[arg(long)]
        attachable: bool,
        #[arg(long)]
        subnet: Option<String>,
        /// Make this the cluster's ingress network (the routing mesh's), in place of a removed one.
        #[arg(long)]
        ingress: bool,
        name: String,
    },
    Ls {
        #[command(flatten)]
        f: Format,
    },
    Inspect {
        name: String,
    },
    Rm {
        name: String,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        replicas: i64,
        /// replicated or global
        #[arg(long, default_value = "replicated")]
        mode: String,
        #[arg(long)]
        network: Vec<String>,
        /// vip or dnsrr
        #[arg(long, default_value = "vip")]
        endpoint_mode: String,
        /// PUBLISHED:TARGET[/tcp|/udp], TARGET (published port from 30000-32767), or
        /// published=P,target=T,protocol=tcp|udp,mode=ingress|host
        #[arg(short, long)]
        publish: Vec<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    Ls {
        #[command(flatten)]
        f: Format,
    },
    Ps {
        name: String,
        #[command(flatten)]
        f: Format,
    },
    Inspect {
        name: String,
    },
    /// SERVICE=REPLICAS
    Scale {
        spec: String,
    },
    /// Change a running service's published ports; its tasks keep running.
    Update {
        name: String,
        /// A port to publish, as `service create --publish`.
        #[arg(long)]
        publish_add: Vec<String>,
        /// A published port to withdraw: PUBLISHED[/tcp|/udp].
        #[arg(long)]
        publish_rm: Vec<String>,
    },
    Rm {
        name: String,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hickory_server=warn,hickory_proto=warn,hickory_net=warn"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).with_env_filter(filter).init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
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
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let host = cli.host.clone();
    match cli.cmd {
        Cmd::Manager { d, listen_addr, default_addr_pool, heartbeat_interval, data_path_port, ingress_subnet, gossip_key_rotation, force_new_cluster } => {
            init_logging();
            if !(0.05..=3600.0).contains(&heartbeat_interval) {
                bail!("--heartbeat-interval {heartbeat_interval}: expected 0.05 to 3600 seconds");
            }
            if data_path_port == 0 {
                bail!("--data-path-port 0: choose a UDP port (default 4789)");
            }
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
            ))?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Agent { d, join, token } => {
            init_logging();
            let c = d.node_config()?;
            daemon_runtime()?.block_on(daemon::run_agent(c, join, token))?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::SimEndpoints { gossip_addr, seed, network, count, vips, keys_from } => {
            init_logging();
            daemon_runtime()?.block_on(sim::endpoints(gossip_addr, seed, network, count, vips, &keys_from))?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::SandboxHold => {
            // Blocks until killed; the namespace lives as long as this process.
            loop {
                std::thread::park();
            }
        }
        Cmd::SimNodes { join, token, count, advertise_addr, data_dir } => {
            init_logging();
            daemon_runtime()?.block_on(sim::run(join, token, count, &data_dir, advertise_addr))?;
            return Ok(ExitCode::SUCCESS);
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
        Cmd::Node(NodeCmd::Rm { node, force }) => {
            let r: Removed = call(&host, ApiRequest::NodeRm { node, force })?;
            println!("{}", r.name);
            return Ok(ExitCode::SUCCESS);
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
                println!("backend: {}", t.backend.as_deref().unwrap_or("none"));
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
        Cmd::Network(NetworkCmd::Inspect { name }) => print_json(&call::<NetworkDetail>(&host, ApiRequest::NetworkInspect { name })?)?,
        Cmd::Network(NetworkCmd::Rm { name }) => println!("{}", call::<Removed>(&host, ApiRequest::NetworkRm { name })?.name),
        Cmd::Service(ServiceCmd::Create { name, replicas, mode, network, endpoint_mode, publish, command }) => {
            let endpoint_mode = match endpoint_mode.as_str() {
                "vip" => EndpointMode::Vip,
                "dnsrr" => EndpointMode::Dnsrr,
                m => bail!("invalid --endpoint-mode {m:?}: expected vip or dnsrr"),
            };
            let s: ServiceInfo = call(&host, ApiRequest::ServiceCreate { spec: ServiceCreate { name, mode, replicas, networks: network, endpoint_mode, publish, command } })?;
            println!("{}", s.id);
        }
        Cmd::Service(ServiceCmd::Inspect { name }) => print_json(&call::<ServiceInfo>(&host, ApiRequest::ServiceInspect { name })?)?,
        Cmd::Service(ServiceCmd::Scale { spec }) => {
            let (name, n) = spec.split_once('=').ok_or_else(|| anyhow!("invalid scale {spec:?}: expected SERVICE=REPLICAS"))?;
            let replicas: i64 = n.parse().map_err(|_| anyhow!("invalid scale {spec:?}: {n:?} is not a number"))?;
            println!("{}", call::<ServiceInfo>(&host, ApiRequest::ServiceScale { name: name.to_string(), replicas })?.name);
        }
        Cmd::Service(ServiceCmd::Update { name, publish_add, publish_rm }) => {
            if publish_add.is_empty() && publish_rm.is_empty() {
                bail!("service update {name}: nothing to change (give --publish-add or --publish-rm)");
            }
            println!("{}", call::<ServiceInfo>(&host, ApiRequest::ServiceUpdate { name, publish_add, publish_rm })?.name);
        }
        Cmd::Service(ServiceCmd::Rm { name }) => println!("{}", call::<Removed>(&host, ApiRequest::ServiceRm { name })?.name),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn socket_path(host: &Option<String>) -> anyhow::Result<PathBuf> {
    match host {
        None => Ok(daemon::control_socket(&PathBuf::from(DEFAULT_DATA_DIR))),
        Some(h) => match h.strip_prefix("unix://") {
            Some(p) => Ok(PathBuf::from(p)),
            None => bail!("--host {h:?}: only unix:///path/to/control.sock is supported"),
        },
    }
}

/// One request to the local daemon; its reply's data as `T` (a refusal is an error with the
/// daemon's reason; a reply of another shape is an error too, never an empty field).
fn call<T: DeserializeOwned>(host: &Option<String>, req: ApiRequest) -> anyhow::Result<T> {
    let path = socket_path(host)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply: Reply = rt.block_on(async {
        let mut s = tokio::net::UnixStream::connect(&path).await.with_context(|| format!("cannot reach the swarmnet daemon at {} (is it running? set --host or SWARMNET_HOST)", path.display()))?;
        swarmnet_api::write_msg(&mut s, &req).await?;
        swarmnet_api::read_msg(&mut s).await?.ok_or_else(|| anyhow!("the daemon closed the connection without answering"))
    })?;
    Ok(reply.into_data()?)
}

/// "12h", "30m", "90s" or plain seconds; at least 10 s.
fn parse_duration(s: &str) -> Result<Duration, String> {
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
    if secs < 10 {
        return Err(format!("{s:?}: at least 10s"));
    }
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
}
