//! `swarmnet-sim gossip-sim`: the real gossip core ([`swarmnet_gossip::sim::Sim`]) at N
//! nodes in virtual time (issue 23). Prints, one line each: membership convergence, idle
//! traffic, a change reaching every node (p50/p99 over the trials) and the traffic while
//! changing, stream syncs in flight at most, and peak heap per node. `--validate` runs the
//! real processes (`gossip_real`) and the simulator side by side at the same sizes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use swarmnet_gossip::sim::{Cpu, NetModel, Sim};
use swarmnet_gossip::{Config, Event};

use crate::alloc;

/// The running size's budgets, for [`Sim::abort`] (a plain function: it captures nothing).
static BUDGET: std::sync::Mutex<Option<(Instant, Duration, usize)>> = std::sync::Mutex::new(None);

fn over_budget() -> bool {
    match *BUDGET.lock().unwrap_or_else(|p| p.into_inner()) {
        Some((start, real, heap)) => start.elapsed() > real || alloc::current() > heap,
        None => false,
    }
}
use crate::gossip_real::{self, pct};

#[derive(Clone, Debug)]
pub struct Args {
    pub nodes: usize,
    pub loss: f64,
    pub latency_ms: (f64, f64),
    pub cpu: Cpu,
    pub sealed: bool,
    pub trials: usize,
    /// One trial starts this long after the one before started (or once it is done).
    pub pace: Duration,
    pub idle: Duration,
    /// Longest virtual time for membership to converge.
    pub limit: Duration,
    /// Longest real time the whole run may take; past it, what was measured is reported.
    pub budget: Duration,
    /// Most heap the run may hold (bytes); past it, the same.
    pub max_heap: usize,
    /// What the system costs per datagram sent or received (see [`calibrate`]).
    pub per_message: Duration,
    /// What an idle runtime adds before it starts on something (see [`Costs::wake`]).
    pub wake: Duration,
    /// The nodes' gossip settings (the agent's defaults unless overridden).
    pub cfg: Config,
    pub seed: u64,
    /// After the trials: every node publishes its share of this many endpoints, then one
    /// node restarts and rejoins the network (0: not run).
    pub rejoin_endpoints: usize,
    /// After that: the faults (halves healed, 10 % restarting at once, a clock 50 s off,
    /// 5 % loss), those of [`FAULTS`] named here.
    pub faults: Vec<String>,
    /// Once idle: print where the heap goes, by part, and stop.
    pub heap_breakdown: bool,
    /// The nodes join the cluster, then the benchmark's network, in this many waves, [`WAVE_GAP`] apart.
    pub join_waves: usize,
}

/// Virtual time between two waves of a network join: a wave's records have spread by then
/// (2.7 s at 1,000 and 2,000 nodes all at once).
const WAVE_GAP: Duration = Duration::from_secs(3);

/// What a simulated run measured (virtual time).
#[derive(Clone, Debug, Default)]
pub struct SimFigures {
    /// None: not converged within the limit (or the budget).
    pub converged_s: Option<f64>,
    pub short: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub reached_all: usize,
    pub idle_bps: f64,
    pub busy_bps: f64,
    pub max_streams: usize,
    pub heap_per_node_kib: f64,
    pub real_s: f64,
    /// The real-time budget ran out: what follows it was not measured.
    pub out_of_budget: bool,
    /// Real time in the nodes' code per datagram sent or received during the trials, the
    /// system's costs charged included (none charged: the code alone), in microseconds.
    pub trial_work_per_message_us: f64,
}

/// Per node per second, in bytes.
fn rate(bytes: u64, n: usize, d: Duration) -> f64 {
    bytes as f64 / n.max(1) as f64 / d.as_secs_f64().max(1e-9)
}

fn kib_per_node(bytes: usize, n: usize) -> f64 {
    bytes as f64 / 1024.0 / n.max(1) as f64
}

/// A check for `run_until`: each of the first `nodes` nodes has known at least `peers - 1`
/// peers on `network`, once. A node that got there is not asked again, and each check stops
/// at the first node short: checking every node against every other each 10 ms of virtual
/// time was most of the real time of a 5,000-node run.
fn all_know_all(nodes: usize, peers: usize, network: &'static str) -> impl FnMut(&Sim) -> bool {
    let mut short: Vec<usize> = (0..nodes).rev().collect();
    move |s| {
        while let Some(&i) = short.last() {
            if s.nodes[i].network_peer_count(network) + 1 < peers {
                return false;
            }
            short.pop();
        }
        true
    }
}

/// One simulated run, printed as it goes.
pub fn simulate(a: &Args) -> SimFigures {
    let real = Instant::now();
    let n = a.nodes;
    let ms = |x: f64| Duration::from_micros((x * 1000.0) as u64);
    let model = NetModel { latency: (ms(a.latency_ms.0), ms(a.latency_ms.1)), loss: a.loss, cpu: a.cpu, sealed: a.sealed, per_message: a.per_message, wake: a.wake, ..NetModel::default() };
    println!(
        "gossip-sim: {n} nodes, latency {:?}..{:?}, loss {}, cpu {:?} ({:?} a datagram, {:?} a wake-up), sealed {}, seed {}",
        model.latency.0, model.latency.1, a.loss, a.cpu, a.per_message, a.wake, a.sealed, a.seed
    );
    let mut f = SimFigures { p50_ms: f64::NAN, p99_ms: f64::NAN, ..SimFigures::default() };
    let heap0 = alloc::current();
    alloc::reset_peak();
    *BUDGET.lock().unwrap_or_else(|p| p.into_inner()) = Some((real, a.budget, a.max_heap));
    let mut s = Sim::new(n, a.cfg.clone(), model, a.seed);
    s.abort = Some(over_budget);
    // Who has seen each endpoint id, and when the last one did.
    let seen: Rc<RefCell<HashMap<String, (usize, Instant)>>> = Rc::new(RefCell::new(HashMap::new()));
    let sink = seen.clone();
    // When the latest `NodeUp` came: membership converged then (the check below, every
    // 10 ms, only says that it has).
    let last_up: Rc<std::cell::Cell<Option<Instant>>> = Rc::new(std::cell::Cell::new(None));
    let ups = last_up.clone();
    s.observe(Box::new(move |_, e, t| {
        if let Event::NodeUp(_) = e {
            ups.set(Some(t));
        }
        if let Event::Endpoint(c) = e {
            if c.new.is_some() {
                let mut m = sink.borrow_mut();
                let x = m.entry(c.id.clone()).or_insert((0, t));
                x.0 += 1;
                x.1 = t;
            }
        }
    }));
    let spent = over_budget;
    let over = |f: &mut SimFigures| {
        f.out_of_budget = f.out_of_budget || spent();
        f.out_of_budget
    };
    let waves = a.join_waves.clamp(1, n);
    for w in 0..waves {
        if w > 0 {
            s.run_for(WAVE_GAP);
        }
        s.join_range(w * n / waves..(w + 1) * n / waves);
    }
    let wave = if waves > 1 { format!(" (joined in {waves} waves {} s apart; from the last)", WAVE_GAP.as_secs()) } else { String::new() };
    let last_wave = s.now;
    let conv = s.run_until(a.limit, Duration::from_millis(10), |s| s.converged() || spent());
    let max_streams = s.max_streams;
    f.short = s.not_converged();
    let exact = last_up.get().map(|t| t.saturating_duration_since(last_wave));
    f.converged_s = conv.filter(|_| f.short == 0).map(|t| exact.unwrap_or(t).min(t).as_secs_f64());
    match f.converged_s {
        Some(t) => println!("membership converged in {t:.2} s virtual{wave} ({:.1} s real); stream syncs in flight at most {max_streams}", real.elapsed().as_secs_f64()),
        None => println!(
            "membership NOT converged within {:.1} s virtual ({:.1} s real{}): {} of {n} nodes short; stream syncs in flight at most {max_streams}",
            conv.unwrap_or(a.limit).as_secs_f64(),
            real.elapsed().as_secs_f64(),
            if spent() { ", real-time or heap budget spent" } else { "" },
            f.short
        ),
    }
    println!(
        "peak heap while joining: {:.1} KiB per node; messages in flight at most {:.1} KiB per node; members declared down {}",
        kib_per_node(alloc::peak().saturating_sub(heap0), n),
        kib_per_node(s.max_in_flight_bytes, n),
        failures(&s)
    );
    if over(&mut f) {
        f.max_streams = max_streams;
        f.heap_per_node_kib = kib_per_node(alloc::peak().saturating_sub(heap0), n);
        f.real_s = real.elapsed().as_secs_f64();
        return f;
    }
    for w in 0..waves {
        if w > 0 {
            s.run_for(WAVE_GAP);
        }
        for i in w * n / waves..(w + 1) * n / waves {
            s.with(i, |g, now| g.join_network("bench", now));
        }
    }
    // Idle is measured once every node knows every other is on the network (the records
    // spread by gossip; a mass join's tail is not idle), and at least 2 s after the join, as
    // the real benchmark waits.
    let joined = s.run_until(Duration::from_secs(60), Duration::from_millis(10), all_know_all(n, n, "bench"));
    match joined {
        Some(t) => println!("network join: {n} nodes joined a network{wave}; each knew every other was on it {:.2} s virtual later", t.as_secs_f64()),
        None => println!("network join: {n} nodes joined a network{wave}; NOT all known to each other within 60 s virtual"),
    }
    println!(
        "peak heap so far: {:.1} KiB per node ({:.0} B per member); messages in flight at most {:.1} KiB per node; members declared down so far {}",
        kib_per_node(alloc::peak().saturating_sub(heap0), n),
        alloc::peak().saturating_sub(heap0) as f64 / (n as f64 * n as f64),
        kib_per_node(s.max_in_flight_bytes, n),
        failures(&s)
    );
    s.run_for(Duration::from_secs(2).saturating_sub(joined.unwrap_or_default()));
    let b0 = s.bytes_sent();
    s.run_for(a.idle);
    f.idle_bps = rate(s.bytes_sent() - b0, n, a.idle);
    println!(
        "idle: {:.0} bytes per node per second over {:.0} s virtual; heap in use then {:.1} KiB per node ({:.0} B per member)",
        f.idle_bps,
        a.idle.as_secs_f64(),
        kib_per_node(alloc::current().saturating_sub(heap0), n),
        alloc::current().saturating_sub(heap0) as f64 / (n as f64 * n as f64)
    );
    if a.heap_breakdown {
        // Each part dropped on every node in turn: what the heap fell by is what it held.
        for part in swarmnet_gossip::HEAP_PARTS {
            let before = alloc::current();
            for g in &mut s.nodes {
                g.shed(part);
            }
            println!("  heap in {part}: {:.0} B per member", before.saturating_sub(alloc::current()) as f64 / (n as f64 * n as f64));
        }
        let (ids, id_bytes) = swarmnet_gossip::interned();
        println!("  interned identities: {ids} ({:.0} B each; the simulator's nodes share them, a real node holds one per member)", id_bytes as f64 / ids.max(1) as f64);
        println!("  left (the simulator's own, the nodes' fixed state, the shared identities): {:.1} KiB per node", kib_per_node(alloc::current().saturating_sub(heap0), n));
        f.real_s = real.elapsed().as_secs_f64();
        return f;
    }

    let mut rng = gossip_real::OWNERS_SEED;
    let datagrams = |s: &Sim| s.nodes.iter().map(|g| g.stats.udp_sent + g.stats.received).sum::<u64>();
    let (b0, t0, work0, d0) = (s.bytes_sent(), s.now, s.work, datagrams(&s));
    let mut took = Vec::new();
    for k in 0..a.trials {
        if over(&mut f) {
            break;
        }
        // The real benchmark's sequence of owners.
        let owner = gossip_real::next_owner(&mut rng, n);
        let id = format!("t{k}");
        let start = s.now;
        s.with(owner, |g, now| g.set_endpoint(gossip_real::ep(k), now));
        let all = s.run_until(Duration::from_secs(30), Duration::from_millis(1), |_| seen.borrow().get(&id).is_some_and(|x| x.0 >= n));
        if let (Some(_), Some(x)) = (all, seen.borrow().get(&id)) {
            took.push(x.1.saturating_duration_since(start).as_secs_f64() * 1000.0);
        }
        s.run_for(a.pace.saturating_sub(s.now - start));
    }
    let changing = s.now - t0;
    f.trial_work_per_message_us = (s.work - work0).as_secs_f64() * 1e6 / datagrams(&s).saturating_sub(d0).max(1) as f64;
    f.reached_all = took.len();
    f.p50_ms = pct(&mut took.clone(), 50.0);
    f.p99_ms = pct(&mut took, 99.0);
    f.busy_bps = rate(s.bytes_sent() - b0, n, changing);
    f.max_streams = s.max_streams;
    println!(
        "a change reaching every node: {}/{} trials reached all, p50 {:.1} ms p99 {:.1} ms virtual{}",
        f.reached_all,
        a.trials,
        f.p50_ms,
        f.p99_ms,
        if f.out_of_budget { " (real-time budget spent: trials cut short)" } else { "" }
    );
    println!("while changing: {:.0} bytes per node per second; stream syncs in flight at most {} (all run)", f.busy_bps, s.max_streams);
    println!("network: {:?}; real time in the nodes' code {:.1} s", s.net, s.work.as_secs_f64());
    let sum = |f: fn(&swarmnet_gossip::Stats) -> u64| s.nodes.iter().map(|g| f(&g.stats)).sum::<u64>();
    println!(
        "members declared down {}; pushes sent again {}, given up {}, held back by the budget {}; exchanges deferred (max_syncs) {}, views withheld (full_replies_per_sec) {}",
        sum(|x| x.failures_detected),
        sum(|x| x.retransmitted),
        sum(|x| x.push_given_up),
        sum(|x| x.retransmits_deferred),
        sum(|x| x.syncs_deferred),
        sum(|x| x.full_replies_withheld)
    );
    if a.rejoin_endpoints > 0 && !over(&mut f) {
        rejoin(&mut s, a.rejoin_endpoints);
    }
    if !a.faults.is_empty() && !over(&mut f) {
        faults(&mut s, &a.faults);
    }
    f.heap_per_node_kib = kib_per_node(alloc::peak().saturating_sub(heap0), n);
    f.real_s = real.elapsed().as_secs_f64();
    println!("peak heap: {:.1} KiB per node (messages in flight at most {:.1} KiB per node); {:.1} s real in all", f.heap_per_node_kib, kib_per_node(s.max_in_flight_bytes, n), f.real_s);
    f
}

/// An endpoint of node `i` (its `k`-th) for the rejoin phase.
fn owned_ep(i: usize, k: usize) -> swarmnet_types::Endpoint {
    let mut e = gossip_real::ep(k);
    e.id = format!("r{i}-{k}");
    e.ip = std::net::Ipv4Addr::from(0x0a80_0000u32 | ((i as u32) << 6) | k as u32);
    e
}

/// Nodes on the rejoin's network, at most: as in a swarm, a network spans the nodes that
/// run its tasks, not every node (10,000 nodes each holding 10,000 endpoints would not fit
/// this machine's memory).
const REJOIN_NODES: usize = 1000;

/// The first [`REJOIN_NODES`] nodes join a network and publish their share of `total`
/// endpoints there; once each of them holds them all, one of them restarts (empty table, a
/// new generation) and rejoins the network: how long until it holds every other node's
/// endpoints again, the stream messages in flight meanwhile, and the bytes it received.
fn rejoin(s: &mut Sim, total: usize) {
    let real = Instant::now();
    let n = s.nodes.len().min(REJOIN_NODES);
    let per = total.div_ceil(n).min(64);
    // The network first: how long until each of its nodes knows every other is on it
    // (membership records spread by gossip).
    for i in 0..n {
        s.with(i, |g, now| g.join_network("big", now));
    }
    match s.run_until(Duration::from_secs(120), Duration::from_millis(10), all_know_all(n, n, "big")) {
        Some(t) => println!("network join: {n} nodes joined a network at once; each knew every other was on it {:.2} s virtual later", t.as_secs_f64()),
        None => println!("network join: {n} nodes joined a network at once; NOT all known to each other within 120 s virtual"),
    }
    for i in 0..n {
        s.with(i, |g, now| {
            for k in 0..per {
                let mut e = owned_ep(i, k);
                e.network = "big".into();
                g.set_endpoint(e, now);
            }
        });
    }
    let want = per * n;
    let count = |g: &swarmnet_gossip::Gossip| g.table().endpoints("big").len();
    let spread = s.run_until(Duration::from_secs(120), Duration::from_millis(50), |s| s.nodes[..n].iter().all(|g| count(g) >= want));
    let Some(spread) = spread else {
        println!("rejoin: {want} endpoints did not reach every node within 120 s virtual");
        return;
    };
    let k = n / 2 + 1;
    s.run_for(Duration::from_secs(5));
    s.max_streams = s.streams_in_flight();
    s.crash(k);
    s.restart(k, 0);
    s.with(k, |g, now| {
        g.join_network("bench", now);
        g.join_network("big", now);
    });
    let others = want - per;
    let took = s.run_until(Duration::from_secs(60), Duration::from_millis(10), |s| count(&s.nodes[k]) >= others);
    let g = &s.nodes[k];
    match took {
        Some(t) => println!(
            "rejoin: {want} endpoints ({per} a node on {n} nodes) reached each of those in {:.2} s virtual; node {k} restarted and held the others' {others} again {:.0} ms virtual after it started (goal ≤ 2 s); stream messages in flight at most {} meanwhile; it received {:.1} MiB in {} messages ({:.0} s real)",
            spread.as_secs_f64(),
            t.as_secs_f64() * 1000.0,
            s.max_streams,
            g.stats.received_bytes as f64 / (1 << 20) as f64,
            g.stats.received,
            real.elapsed().as_secs_f64()
        ),
        None => println!("rejoin: node {k} restarted and holds {} of {others} endpoints after 60 s virtual", count(g)),
    }
}

fn failures(s: &Sim) -> u64 {
    s.nodes.iter().map(|g| g.stats.failures_detected).sum()
}

/// Suspicions raised by the nodes' own probes, those their timers turned into deaths, and
/// the refutations the suspected members made, in all.
fn suspicions(s: &Sim) -> [u64; 5] {
    s.nodes.iter().fold([0; 5], |[a, b, c, d, e], g| [a + g.stats.suspicions, b + g.stats.suspicions_to_death, c + g.stats.refutations, d + g.stats.rejoins, e + g.stats.renewals])
}

/// The faults, by name, in the order they run.
pub const FAULTS: [&str; 4] = ["partition", "restart", "clock", "loss"];

/// The faults (those of [`FAULTS`] in `which`), one after the other on the converged
/// cluster, each with the time to converge again.
fn faults(s: &mut Sim, which: &[String]) {
    let on = |f: &str| which.iter().any(|w| w == f);
    let n = s.nodes.len();
    let limit = Duration::from_secs(120);
    let step = Duration::from_millis(50);
    let real = Instant::now();
    let report = |what: &str, t: Option<Duration>, s: &Sim| match t {
        Some(t) => println!("fault: {what}: converged again {:.2} s virtual after ({:.0} s real so far)", t.as_secs_f64(), real.elapsed().as_secs_f64()),
        None => println!("fault: {what}: NOT converged again within {} s virtual ({} nodes short)", limit.as_secs(), s.not_converged()),
    };
    // Halves, apart for 10 s (each declares the other down), then healed.
    if on("partition") {
        for i in n / 2..n {
            s.set_partition(i, 1);
        }
        s.run_for(Duration::from_secs(10));
        s.heal();
        let t = s.run_until(limit, step, Sim::converged);
        report("partition into halves for 10 s, healed", t, s);
    }
    // A tenth of the nodes restart at once (new generation, empty state).
    if on("restart") {
        s.run_for(Duration::from_secs(5));
        let restarting: Vec<usize> = (0..n).filter(|i| i % 10 == 5).collect();
        for &i in &restarting {
            s.crash(i);
        }
        for &i in &restarting {
            s.restart(i, 0);
            s.with(i, |g, now| g.join_network("bench", now));
        }
        let t = s.run_until(limit, step, Sim::converged);
        report(&format!("{} nodes (10 %) restarting at once", restarting.len()), t, s);
    }
    // A node whose clock runs 50 s ahead restarts and joins.
    if on("clock") {
        s.run_for(Duration::from_secs(5));
        let k = n / 3 + 1;
        s.crash(k);
        s.skew_clock(k, true, Duration::from_secs(50));
        s.restart(k, 0);
        s.with(k, |g, now| g.join_network("bench", now));
        let t = s.run_until(limit, step, Sim::converged);
        report("a node with a clock 50 s ahead restarting", t, s);
    }
    if !on("loss") {
        return;
    }
    // 5 % loss for 60 s, no node down: every member declared down is a false death.
    s.run_for(Duration::from_secs(5));
    let loss = s.model.loss;
    s.model.loss = 0.05;
    let before = failures(s);
    let sus_before = suspicions(s);
    let loss_start = s.now;
    let mut took = Vec::new();
    let mut rng = gossip_real::OWNERS_SEED ^ 0x55;
    for k in 0..20 {
        let owner = gossip_real::next_owner(&mut rng, n);
        let mut e = gossip_real::ep(100_000 + k);
        e.id = format!("loss{k}");
        let start = s.now;
        s.with(owner, |g, now| g.set_endpoint(e, now));
        let id = format!("loss{k}");
        if let Some(t) = s.run_until(Duration::from_secs(30), Duration::from_millis(5), |s| s.nodes.iter().all(|g| g.table().get("bench", &id).is_some())) {
            took.push(t.as_secs_f64() * 1000.0);
        }
        s.run_for(Duration::from_secs(3).saturating_sub(s.now - start));
    }
    let false_deaths = failures(s) - before;
    let sus = suspicions(s);
    println!(
        "fault: 5 % loss: {} suspicions raised by probes, {} of them declared down by their suspecter's timer, {} refutations; {} rejoins after being declared down, {} starts over",
        sus[0] - sus_before[0],
        sus[1] - sus_before[1],
        sus[2] - sus_before[2],
        sus[3] - sus_before[3],
        sus[4] - sus_before[4]
    );
    println!(
        "fault: 5 % loss for {:.0} s: {false_deaths} members declared down (none was); a change reaching every node {}/20, p50 {:.1} ms p99 {:.1} ms virtual (checked every 5 ms)",
        (s.now - loss_start).as_secs_f64(),
        took.len(),
        pct(&mut took.clone(), 50.0),
        pct(&mut took, 99.0)
    );
    s.model.loss = loss;
}

/// What the system costs beyond the gossip code, measured on a runtime like the real
/// server's: `workers` tokio workers, UDP sockets on loopback.
#[derive(Clone, Copy, Debug)]
pub struct Costs {
    /// CPU time a datagram sent, or one received, takes on a busy runtime (half of what a
    /// datagram takes from its send to its receipt).
    pub per_message: Duration,
    /// What an idle runtime adds to a message: half a ping-pong's round trip (one datagram
    /// each way at a time, so each finds the runtime parked), less a datagram's CPU time.
    pub wake: Duration,
}

/// Measures [`Costs`]. First busy: 16 pairs of sockets, each echoing 8 datagrams in flight
/// for 1.5 s, the process's CPU time over the datagrams; then one more pair, one datagram
/// at a time.
pub fn calibrate(workers: usize) -> anyhow::Result<Costs> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::net::UdpSocket;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers.max(1)).enable_all().build()?;
    rt.block_on(async {
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let a = UdpSocket::bind("127.0.0.1:0").await?;
            let b = UdpSocket::bind("127.0.0.1:0").await?;
            let (aa, ba) = (a.local_addr()?, b.local_addr()?);
            tasks.push(tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while let Ok((k, _)) = b.recv_from(&mut buf).await {
                    let _ = b.send_to(&buf[..k], aa).await;
                }
            }));
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let msg = [7u8; 200];
                for _ in 0..8 {
                    let _ = a.send_to(&msg, ba).await;
                }
                let mut buf = [0u8; 512];
                while a.recv_from(&mut buf).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                    let _ = a.send_to(&msg, ba).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (d0, c0) = (done.load(Ordering::Relaxed), gossip_real::cpu_time());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (d1, c1) = (done.load(Ordering::Relaxed), gossip_real::cpu_time());
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        let cpu = c1.zip(c0).map(|(c1, c0)| c1.saturating_sub(c0)).ok_or_else(|| anyhow::anyhow!("calibration: cannot read this process's CPU time"))?;
        // Each echo answered is two datagrams, each a send and a receive.
        let sends_and_receives = 4 * d1.saturating_sub(d0);
        anyhow::ensure!(sends_and_receives > 0, "calibration: no datagram came back on loopback");
        let per_message = cpu / u32::try_from(sends_and_receives).unwrap_or(u32::MAX);

        let a = UdpSocket::bind("127.0.0.1:0").await?;
        let b = UdpSocket::bind("127.0.0.1:0").await?;
        let (aa, ba) = (a.local_addr()?, b.local_addr()?);
        const ROUNDS: usize = 5000;
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            for _ in 0..ROUNDS {
                let (k, _) = b.recv_from(&mut buf).await?;
                b.send_to(&buf[..k], aa).await?;
            }
            Ok::<(), std::io::Error>(())
        });
        // On a worker, as the server's loop runs: not on the thread that blocks on the
        // runtime, which each answer would have to wake as well.
        let ping = tokio::spawn(async move {
            let msg = [7u8; 200];
            let mut buf = [0u8; 512];
            let t = Instant::now();
            for _ in 0..ROUNDS {
                a.send_to(&msg, ba).await?;
                a.recv_from(&mut buf).await?;
            }
            Ok::<Duration, std::io::Error>(t.elapsed() / ROUNDS as u32)
        });
        let rtt = ping.await??;
        echo.await??;
        // Half a round trip is one datagram: a send, a receive and the wake-up between (the
        // loopback's delivery is part of the send; the simulator's latency is then nil).
        Ok(Costs { per_message, wake: (rtt / 2).saturating_sub(2 * per_message) })
    })
}

fn ratio(sim: f64, real: f64) -> String {
    if real > 0.0 && sim.is_finite() && real.is_finite() {
        format!("{:.2}x", sim / real)
    } else {
        "-".into()
    }
}

/// The real processes and the simulator (sealed, every node on `cores` shared cores,
/// loopback latency) at each size, and how far apart their figures are: the simulator
/// charging the code alone, then the sockets' measured costs ([`calibrate`]), then what
/// a datagram cost the real server in a burst less the code's share. The real
/// instances run on as many tokio workers; on a machine with more cores than that, pin the
/// process to `cores` of them (`taskset`).
pub fn validate(sizes: &[usize], trials: usize, idle: Duration, cores: usize) -> anyhow::Result<()> {
    let costs = calibrate(cores)?;
    println!("calibrated on {cores} workers: {:?} a datagram sent or received (busy), {:?} a wake-up", costs.per_message, costs.wake);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(cores.max(1)).enable_all().build()?;
    for (k, &n) in sizes.iter().enumerate() {
        let real = rt.block_on(gossip_real::dissemination(n, trials, 21000 + 1000 * k as u16, idle, true, true))?;
        if let Some(cpu) = real.cpu_per_message_us {
            println!("N={n}: idle, the real instances spent {cpu:.1} us of CPU a datagram sent or received (their timers and wake-ups included)");
        }
        // The code alone, then the sockets' costs; then what the real server's datagram
        // cost in a burst, less the code's share, as the system's cost a datagram.
        let code = validate_one(n, trials, idle, Costs { per_message: Duration::ZERO, wake: Duration::ZERO }, cores, &real, "the code alone");
        validate_one(n, trials, idle, costs, cores, &real, "the sockets' costs");
        match real.burst_cpu_per_message_us {
            Some(burst) => {
                let rest = (burst - code.trial_work_per_message_us).max(0.0);
                println!("N={n}: in a burst, the real server spent {burst:.1} us of CPU a datagram sent or received; the code {:.1} us of it: {rest:.1} us charged", code.trial_work_per_message_us);
                validate_one(n, trials, idle, Costs { per_message: Duration::from_nanos((rest * 1000.0) as u64), wake: costs.wake }, cores, &real, "the burst's cost");
            }
            None => println!("N={n}: the burst's CPU time could not be read"),
        }
    }
    Ok(())
}

/// One simulated run beside the real figures, both printed.
fn validate_one(n: usize, trials: usize, idle: Duration, costs: Costs, cores: usize, real: &gossip_real::Figures, how: &str) -> SimFigures {
    let a = Args {
        nodes: n,
        loss: 0.0,
        // Loopback: a datagram is delivered within its send, which the costs include.
        latency_ms: (0.0, 0.0),
        cpu: Cpu::Shared(cores.max(1)),
        sealed: true,
        trials,
        pace: Duration::from_secs(1),
        idle,
        limit: Duration::from_secs(300),
        budget: Duration::from_secs(3600),
        max_heap: 8 << 30,
        per_message: costs.per_message,
        wake: costs.wake,
        cfg: Config::default(),
        seed: 1,
        rejoin_endpoints: 0,
        faults: Vec::new(),
        heap_breakdown: false,
        join_waves: 1,
    };
    let sim = simulate(&a);
    println!(
        "VALIDATE N={n} ({how}: {cores} cores, {:?} a datagram, {:?} a wake-up): reached all real {}/{} sim {}/{trials}; converged real {:.2} s sim {} ({}); change p50 real {:.1} ms sim {:.1} ms ({}), p99 real {:.1} ms sim {:.1} ms ({}); idle real {:.0} sim {:.0} B/node/s ({}); changing real {:.0} sim {:.0} B/node/s ({})",
        costs.per_message,
        costs.wake,
        real.reached_all,
        real.trials,
        sim.reached_all,
        real.converged_s,
        sim.converged_s.map(|c| format!("{c:.2} s")).unwrap_or_else(|| "none".into()),
        ratio(sim.converged_s.unwrap_or(f64::NAN), real.converged_s),
        real.p50_ms,
        sim.p50_ms,
        ratio(sim.p50_ms, real.p50_ms),
        real.p99_ms,
        sim.p99_ms,
        ratio(sim.p99_ms, real.p99_ms),
        real.idle_bps,
        sim.idle_bps,
        ratio(sim.idle_bps, real.idle_bps),
        real.busy_bps,
        sim.busy_bps,
        ratio(sim.busy_bps, real.busy_bps),
    );
    sim
}
