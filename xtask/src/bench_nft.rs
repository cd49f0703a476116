//! `cargo xtask bench nft` (issue 19, ADR 0021): one transaction of 1,000 DNAT rules, in a
//! network namespace of its own, the way swarmnet writes nftables now (the `nftables`
//! crate's typed schema, serialised to JSON, applied by `nft -j -f -` from a child that
//! enters the namespace) against the text it replaced (`nft -f -`). Runs alternate; the
//! figures are medians and spreads over the runs, build and serialisation included.
//! (rustables, the netlink alternative, is GPL-3.0: it was measured outside the project,
//! see docs/benchmarks.md.)

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use swarmnet_dataplane::nft::{self, NfChainType, NfFamily, NfHook, Tx};

const NS: &str = "snbench-nft";
const TABLE: &str = "bench";
const RULES: u32 = 1000;

fn addr(base: u8, i: u32) -> String {
    format!("10.{base}.{}.{}", i / 250, i % 250 + 1)
}

fn typed() -> Tx {
    let mut tx = Tx::new();
    tx.replace_table(NfFamily::IP, TABLE);
    tx.add(nft::base_chain(NfFamily::IP, TABLE, "c", NfChainType::NAT, NfHook::Prerouting, -100));
    for i in 0..RULES {
        tx.add(nft::rule(
            NfFamily::IP,
            TABLE,
            "c",
            vec![nft::eq(nft::field("ip", "daddr"), nft::s(addr(1, i))), nft::eq(nft::field("tcp", "dport"), nft::n(10_000 + i)), nft::counter(), nft::dnat(addr(2, i), Some(80))],
        ));
    }
    tx
}

fn text() -> String {
    let mut s = format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n  chain c {{\n    type nat hook prerouting priority -100; policy accept;\n");
    for i in 0..RULES {
        let _ = writeln!(s, "    ip daddr {} tcp dport {} counter dnat to {}:80", addr(1, i), 10_000 + i, addr(2, i));
    }
    s.push_str("  }\n}\n");
    s
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

pub fn bench_nft(runs: usize) -> Result<()> {
    swarmnet_lab::require_root()?;
    // The daemon is a release build: so must the Rust side measured here be.
    if cfg!(debug_assertions) {
        let st = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["run", "--release", "-q", "-j2", "-p", "xtask", "--", "bench", "nft", "--runs", &runs.to_string()])
            .status()?;
        if !st.success() {
            bail!("the release run of bench nft failed");
        }
        return Ok(());
    }
    let _ = std::process::Command::new("ip").args(["netns", "del", NS]).output();
    if !std::process::Command::new("ip").args(["netns", "add", NS]).status()?.success() {
        bail!("ip netns add {NS} failed");
    }
    let result = (|| -> Result<()> {
        let ns = std::fs::File::open(format!("/run/netns/{NS}")).context("open the namespace")?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (mut json, mut txt, mut ours) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..runs + 1 {
            // The Rust side (building the objects, the JSON document), then nft's side (the
            // apply joins the commands' text again, a copy of the finished document).
            let t = Instant::now();
            let tx = typed();
            let _ = tx.json();
            let dour = t.elapsed();
            let t = Instant::now();
            rt.block_on(nft::apply(Some(&ns), &tx))?;
            let dj = dour + t.elapsed();
            let t = Instant::now();
            let script = text();
            let mut child = std::process::Command::new("ip").args(["netns", "exec", NS, "nft", "-f", "-"]).stdin(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
            std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, script.as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("nft -f: {}", String::from_utf8_lossy(&out.stderr));
            }
            let dt = t.elapsed();
            // The first pair warms the caches.
            if r > 0 {
                json.push(dj);
                txt.push(dt);
                ours.push(dour);
            }
        }
        let rules = rt.block_on(nft::list_table(Some(&ns), NfFamily::IP, TABLE))?.map_or(0, |o| o.iter().filter(|o| matches!(o, nft::NfListObject::Rule(_))).count());
        if rules != RULES as usize {
            bail!("the table holds {rules} rules, not {RULES}");
        }
        let (j50, t50) = (pct(&mut json, 0.5), pct(&mut txt, 0.5));
        println!("one transaction of {RULES} rules, {runs} runs each (alternating), in a namespace of its own:");
        println!("  typed (nftables crate, nft -j -f): p50 {j50:.1} ms  p10 {:.1}  p90 {:.1}", pct(&mut json, 0.1), pct(&mut json, 0.9));
        println!("    of which building and serialising (release build): p50 {:.2} ms", pct(&mut ours, 0.5));
        println!("  text  (nft -f, before issue 19):   p50 {t50:.1} ms  p10 {:.1}  p90 {:.1}", pct(&mut txt, 0.1), pct(&mut txt, 0.9));
        println!("  typed / text: {:.2}", j50 / t50);
        Ok(())
    })();
    let _ = std::process::Command::new("ip").args(["netns", "del", NS]).output();
    result
}
