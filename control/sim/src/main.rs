//! `swarmnet-sim`: the benchmarks' load generators, kept out of the shipped `swarmnet` binary
//! (issue 19). `cargo xtask bench` runs it next to the daemons.

mod alloc;
mod gossip_real;
mod gossip_sim;
mod sim;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "swarmnet-sim", about = "Benchmarks only: simulated nodes and gossip peers for swarmnet's benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// COUNT simulated nodes that join and keep real sessions, and report every task they
    /// are given as running without starting anything.
    Nodes {
        /// The manager, HOST:PORT.
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
    /// A gossip peer that publishes COUNT endpoints on a network.
    Endpoints {
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
    /// The real gossip core at NODES nodes in virtual time over a network model (issue 23):
    /// membership convergence, idle traffic, a change reaching every node, peak heap.
    GossipSim {
        /// Sizes, comma-separated.
        #[arg(long, default_value = "1000")]
        nodes: String,
        /// Probability that a datagram is lost.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// One-way latency range in milliseconds, `LO..HI` (or one figure).
        #[arg(long, default_value = "1..20")]
        latency_ms: String,
        /// What a node's work costs in virtual time: `free`, `per-node` (the real time its
        /// code took, each node on its own machine) or `shared:K` (all on K cores).
        #[arg(long, default_value = "free")]
        cpu: String,
        /// Seal and open every packet, as the server does.
        #[arg(long)]
        sealed: bool,
        #[arg(long, default_value_t = 50)]
        trials: usize,
        /// Milliseconds from one trial's start to the next one's.
        #[arg(long, default_value_t = 1000)]
        pace_ms: u64,
        /// Virtual seconds of idle traffic to measure.
        #[arg(long, default_value_t = 30)]
        idle_secs: u64,
        /// Longest virtual time for membership to converge.
        #[arg(long, default_value_t = 300)]
        limit_secs: u64,
        /// Longest real time for one size; what was measured by then is reported.
        #[arg(long, default_value_t = 1800)]
        budget_secs: u64,
        /// Most heap for one size, GiB; past it, the same.
        #[arg(long, default_value_t = 12)]
        max_heap_gib: usize,
        /// What the system costs per datagram sent or received, microseconds (default:
        /// measured here when the CPU is modelled, else 0).
        #[arg(long)]
        per_message_us: Option<f64>,
        /// What an idle runtime adds before it starts on something, microseconds (default:
        /// measured here when the CPU is modelled, else 0).
        #[arg(long)]
        wake_us: Option<f64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Instead: the real processes and the simulator side by side at these sizes
        /// (comma-separated), sealed, on `--cores` shared cores.
        #[arg(long)]
        validate: Option<String>,
        /// With `--validate`: tokio workers for the real instances, and cores modelled
        /// (pin the process to as many with `taskset` where the machine has more) [default:
        /// 2].
        #[arg(long)]
        cores: Option<usize>,
        /// After the trials, every node publishes its share of this many endpoints (at
        /// most 64 a node) and one node restarts and rejoins the network (0: skipped).
        #[arg(long, default_value_t = 10000)]
        rejoin_endpoints: usize,
        /// Then the faults: halves healed, 10 % restarting at once, a clock 50 s off, 5 %
        /// loss.
        #[arg(long)]
        faults: bool,
        /// With `--faults`: which of them, comma-separated (partition, restart, clock, loss).
        #[arg(long, default_value = "partition,restart,clock,loss")]
        fault_phases: String,
        /// Once idle, print where each node's heap goes (bytes per member, by part of the
        /// gossip core) and stop there.
        #[arg(long)]
        heap_breakdown: bool,
        /// Nodes join the cluster, then the benchmark's network, in this many waves, 3 s of virtual time apart
        /// (1: all at once; in a mass network join each node's gossip backlog holds a record per member).
        #[arg(long, default_value_t = 1)]
        join_waves: usize,
        /// Failure detection's settings, milliseconds (default: the agent's): the probe
        /// period, the wait for a probe's answer, and a suspicion's time to death.
        #[arg(long)]
        probe_ms: Option<u64>,
        #[arg(long)]
        rtt_ms: Option<u64>,
        #[arg(long)]
        suspect_ms: Option<u64>,
    },
    /// N real gossip instances in this process on loopback (the server the agent runs), for
    /// each size: a change reaching every node, bytes per node; then failure detection.
    Gossip {
        #[arg(long, default_value = "10,50,100,200")]
        sizes: String,
        #[arg(long, default_value_t = 50)]
        trials: usize,
        #[arg(long, default_value_t = 10)]
        idle_secs: u64,
        #[arg(long, default_value_t = 50)]
        fail_nodes: usize,
        #[arg(long, default_value_t = 10)]
        fail_trials: usize,
    },
    /// Failure detection alone, at N real instances.
    GossipFailure {
        #[arg(long, default_value_t = 50)]
        nodes: usize,
        #[arg(long, default_value_t = 10)]
        trials: usize,
    },
    /// What sealing costs at N real instances: rounds without and with it.
    GossipSeal {
        #[arg(long, default_value_t = 200)]
        nodes: usize,
        #[arg(long, default_value_t = 50)]
        trials: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// N real instances with both cores kept busy: live nodes declared dead.
    GossipSoak {
        #[arg(long, default_value_t = 50)]
        nodes: usize,
        #[arg(long, default_value_t = 600)]
        secs: u64,
    },
}

fn sizes(s: &str) -> anyhow::Result<Vec<usize>> {
    s.split(',').map(|x| x.trim().parse::<usize>().map_err(|e| anyhow::anyhow!("sizes {s:?}: {x:?}: {e} (give N,N,…)"))).filter(|r| !matches!(r, Ok(0))).collect()
}

fn cpu(s: &str) -> anyhow::Result<swarmnet_gossip::sim::Cpu> {
    use swarmnet_gossip::sim::Cpu;
    match s {
        "free" => Ok(Cpu::Free),
        "per-node" => Ok(Cpu::PerNode),
        _ => match s.strip_prefix("shared:").map(str::parse::<usize>) {
            Some(Ok(k)) if k > 0 => Ok(Cpu::Shared(k)),
            _ => anyhow::bail!("--cpu {s:?}: free, per-node or shared:K (K > 0)"),
        },
    }
}

/// `LO..HI` or `X` (milliseconds).
fn latency_range(s: &str) -> anyhow::Result<(f64, f64)> {
    let parse = |x: &str| x.trim().parse::<f64>().map_err(|e| anyhow::anyhow!("--latency-ms {s:?}: {e} (give LO..HI or one figure, in milliseconds)"));
    let (lo, hi) = match s.split_once("..") {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => (parse(s)?, parse(s)?),
    };
    if !(lo >= 0.0 && hi >= lo) {
        anyhow::bail!("--latency-ms {s:?}: need 0 <= LO <= HI");
    }
    Ok((lo, hi))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))).init();
    use std::time::Duration;
    match cli.cmd {
        Cmd::GossipSim {
            nodes,
            loss,
            latency_ms,
            cpu: c,
            sealed,
            trials,
            pace_ms,
            idle_secs,
            limit_secs,
            budget_secs,
            max_heap_gib,
            per_message_us,
            wake_us,
            seed,
            validate,
            cores,
            rejoin_endpoints,
            faults,
            fault_phases,
            heap_breakdown,
            join_waves,
            probe_ms,
            rtt_ms,
            suspect_ms,
        } => {
            if let Some(v) = validate {
                if per_message_us.is_some() || wake_us.is_some() {
                    anyhow::bail!("--validate measures its costs: --per-message-us and --wake-us go without it");
                }
                let cores = cores.unwrap_or(2);
                if cores == 0 {
                    anyhow::bail!("--cores 0: at least 1");
                }
                return gossip_sim::validate(&sizes(&v)?, trials, Duration::from_secs(idle_secs), cores);
            }
            if cores.is_some() {
                anyhow::bail!("--cores goes with --validate (the simulator alone models cores with --cpu shared:K)");
            }
            let phases: Vec<String> = fault_phases.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect();
            if let Some(bad) = phases.iter().find(|p| !gossip_sim::FAULTS.contains(&p.as_str())) {
                anyhow::bail!("--fault-phases {fault_phases:?}: {bad:?} is not one of {}", gossip_sim::FAULTS.join(", "));
            }
            let faults = if faults { phases } else { Vec::new() };
            if join_waves == 0 {
                anyhow::bail!("--join-waves 0: at least 1 (all at once)");
            }
            if !(0.0..1.0).contains(&loss) {
                anyhow::bail!("--loss {loss}: a probability, 0 <= loss < 1");
            }
            let latency_ms = latency_range(&latency_ms)?;
            let cpu = cpu(&c)?;
            let us = |flag: &str, v: Option<f64>| match v {
                Some(v) if v >= 0.0 => Ok(Some(Duration::from_nanos((v * 1000.0) as u64))),
                Some(v) => Err(anyhow::anyhow!("{flag} {v}: not negative")),
                None => Ok(None),
            };
            let (p, w) = (us("--per-message-us", per_message_us)?, us("--wake-us", wake_us)?);
            let (per_message, wake) = match (p, w) {
                _ if cpu == swarmnet_gossip::sim::Cpu::Free && (p.is_some() || w.is_some()) => {
                    anyhow::bail!("--per-message-us and --wake-us are charged with --cpu per-node or shared:K only (--cpu free charges nothing)")
                }
                _ if cpu == swarmnet_gossip::sim::Cpu::Free => (Duration::ZERO, Duration::ZERO),
                (Some(p), Some(w)) => (p, w),
                (p, w) => {
                    // Measured on a runtime of as many workers as cores modelled (per-node:
                    // each node's machine runs it alone, on one).
                    let k = match cpu {
                        swarmnet_gossip::sim::Cpu::Shared(k) => k,
                        _ => 1,
                    };
                    let c = gossip_sim::calibrate(k)?;
                    (p.unwrap_or(c.per_message), w.unwrap_or(c.wake))
                }
            };
            let mut gcfg = swarmnet_gossip::Config::default();
            let ms = Duration::from_millis;
            gcfg.probe_period = probe_ms.map_or(gcfg.probe_period, ms);
            gcfg.probe_rtt = rtt_ms.map_or(gcfg.probe_rtt, ms);
            gcfg.suspect_to_down = suspect_ms.map_or(gcfg.suspect_to_down, ms);
            if gcfg.probe_rtt.is_zero() || gcfg.probe_rtt >= gcfg.probe_period || gcfg.suspect_to_down.is_zero() {
                anyhow::bail!("--probe-ms {:?} --rtt-ms {:?} --suspect-ms {:?}: need 0 < rtt < probe and a suspicion > 0", gcfg.probe_period, gcfg.probe_rtt, gcfg.suspect_to_down);
            }
            for n in sizes(&nodes)? {
                gossip_sim::simulate(&gossip_sim::Args {
                    cfg: gcfg.clone(),
                    nodes: n,
                    loss,
                    latency_ms,
                    cpu,
                    sealed,
                    trials,
                    pace: Duration::from_millis(pace_ms),
                    idle: Duration::from_secs(idle_secs),
                    limit: Duration::from_secs(limit_secs),
                    budget: Duration::from_secs(budget_secs),
                    max_heap: max_heap_gib << 30,
                    per_message,
                    wake,
                    seed,
                    rejoin_endpoints,
                    faults: faults.clone(),
                    heap_breakdown,
                    join_waves: join_waves.clamp(1, n),
                });
            }
            return Ok(());
        }
        Cmd::Gossip { sizes: s, trials, idle_secs, fail_nodes, fail_trials } => return gossip_real::bench_gossip(&sizes(&s)?, trials, Duration::from_secs(idle_secs), fail_nodes, fail_trials),
        Cmd::GossipFailure { nodes, trials } => return gossip_real::bench_failure(nodes, trials),
        Cmd::GossipSeal { nodes, trials, rounds } => return gossip_real::bench_gossip_seal(nodes, trials, rounds),
        Cmd::GossipSoak { nodes, secs } => return gossip_real::bench_soak(nodes, Duration::from_secs(secs)),
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match cli.cmd {
        Cmd::Nodes { join, token, count, advertise_addr, data_dir } => rt.block_on(sim::run(join, token, count, &data_dir, advertise_addr)),
        Cmd::Endpoints { gossip_addr, seed, network, count, vips, keys_from } => rt.block_on(sim::endpoints(gossip_addr, seed, network, count, vips, &keys_from)),
        _ => Ok(()),
    }
}
