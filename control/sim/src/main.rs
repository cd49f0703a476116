//! `swarmnet-sim`: the benchmarks' load generators, kept out of the shipped `swarmnet` binary
//! (issue 19). `cargo xtask bench` runs it next to the daemons.

mod sim;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))).init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match cli.cmd {
        Cmd::Nodes { join, token, count, advertise_addr, data_dir } => rt.block_on(sim::run(join, token, count, &data_dir, advertise_addr)),
        Cmd::Endpoints { gossip_addr, seed, network, count, vips, keys_from } => rt.block_on(sim::endpoints(gossip_addr, seed, network, count, vips, &keys_from)),
    }
}
