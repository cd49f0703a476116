//! `cargo xtask bench gossip | failure | gossip-seal | soak | gossip-sim`: the gossip
//! benchmarks run in the benchmarks' own binary, `swarmnet-sim` (release build): the real
//! server instances on loopback (`swarmnet-sim gossip…`), and the simulator of the real
//! gossip core in virtual time (`swarmnet-sim gossip-sim`, issue 23), so that both measure
//! the same optimised code.

use std::process::Command;

use anyhow::{bail, Result};

/// Runs `swarmnet-sim ARGS` (built by `release_binary`), its output straight through.
pub fn run(args: &[String]) -> Result<()> {
    crate::release_binary()?;
    let bin = crate::sim_binary(&std::env::current_dir()?.join("target/release/swarmnet"));
    println!("$ swarmnet-sim {}", args.join(" "));
    let st = Command::new(&bin).args(args).status()?;
    if !st.success() {
        bail!("{} {} failed ({st})", bin.display(), args.join(" "));
    }
    Ok(())
}
