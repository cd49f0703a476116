//! `swarmnet-sim gossip` (run by `cargo xtask bench gossip`, release build): N of swarmnet's
//! gossip instances in one process on loopback (UDP, and TCP for bulk), the same server loop
//! the agent runs, on a runtime of 2 worker threads. One endpoint entry is set at a random
//! node; the time until every node holds it, p50/p99 over the trials, whether every trial
//! reached every node, and bytes sent per node per second. Then failure detection: time
//! until every live node sees a stopped node as dead. `gossip-sim --validate` compares these
//! figures with the simulator's (issue 23).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use swarmnet_gossip::server::{self, Cmd, GossipHandle};
use swarmnet_gossip::{Config, Event, Ident};
use swarmnet_types::{Endpoint, EndpointState};

/// The `k`-th trial's endpoint (the real and the simulated benchmarks publish the same).
pub fn ep(k: usize) -> Endpoint {
    Endpoint {
        network: "bench".into(),
        id: format!("t{k}"),
        task_name: format!("web.{k}"),
        service_name: "web".into(),
        service_id: "svc".into(),
        aliases: vec![],
        ip: Ipv4Addr::new(10, 1, (k / 250) as u8, (k % 250) as u8 + 2),
        mac: [2, 0x42, 10, 1, (k / 250) as u8, (k % 250) as u8 + 2],
        vtep: std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
        vip: None,
        ports: vec![],
        state: EndpointState::Active,
    }
}

type Seen = Arc<Mutex<HashMap<(usize, String), Instant>>>;

/// Where the sequence of trial owners starts (see [`next_owner`]).
pub const OWNERS_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// The next trial's owner among `n` nodes (xorshift): the real and the simulated benchmarks
/// take the same sequence.
pub fn next_owner(rng: &mut u64, n: usize) -> usize {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    (*rng % n.max(1) as u64) as usize
}

/// `p` percent of `v` (NaN for none).
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

/// What one dissemination run measured.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub converged_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub reached_all: usize,
    pub trials: usize,
    pub idle_bps: f64,
    pub busy_bps: f64,
    /// CPU time of the process while idle over the messages the instances sent and
    /// received meanwhile, in microseconds (None where the CPU time cannot be read).
    pub cpu_per_message_us: Option<f64>,
    /// The same in a burst (a change at every instance at once: the runtime busy), less
    /// what idle took meanwhile.
    pub burst_cpu_per_message_us: Option<f64>,
}

/// `sealed`: one cluster key, as the manager hands out (issue 11); otherwise plaintext, to
/// measure what sealing costs.
async fn start_cluster(n: usize, base: u16, seen: &Seen, downs: &Arc<Mutex<HashMap<(usize, String), Instant>>>, sealed: bool) -> Result<(Vec<GossipHandle>, Duration)> {
    let mut hs = Vec::new();
    // The latest `NodeUp` each instance had: membership converged when the last came (the
    // poll below only says that it has, 100 ms late at worst).
    let last_up: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));
    let key = swarmnet_gossip::seal::new_key().map_err(anyhow::Error::msg)?;
    for i in 0..n {
        let addr = SocketAddr::from(([127, 0, 0, 1], base + i as u16));
        // Every instance is on 127.0.0.1: the per-address stream cap would count them as one
        // peer.
        let cfg = Config { max_streams_per_peer: usize::MAX, ..Config::default() };
        let h = server::start(Ident::new(format!("b{i}"), addr, 1), cfg).await?;
        if sealed {
            h.send(Cmd::Keys(Box::new(swarmnet_gossip::seal::Keyring::new(&[(1, key)]).map_err(anyhow::Error::msg)?)))?;
        } else {
            h.send(Cmd::Unsealed)?;
        }
        let mut rx = h.subscribe();
        let seen = seen.clone();
        let downs = downs.clone();
        let last_up = last_up.clone();
        tokio::spawn(async move {
            while let Ok(e) = rx.recv().await {
                let now = Instant::now();
                match e {
                    Event::Endpoint(c) if c.new.is_some() => {
                        seen.lock().unwrap_or_else(|p| p.into_inner()).entry((i, c.id)).or_insert(now);
                    }
                    Event::NodeDown(id) => {
                        downs.lock().unwrap_or_else(|p| p.into_inner()).entry((i, id.node.clone())).or_insert(now);
                    }
                    Event::NodeUp(_) => {
                        last_up.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(now);
                    }
                    _ => {}
                }
            }
        });
        hs.push(h);
    }
    // Everyone announces to node 0 (as agents do to the manager's node list).
    let seed = SocketAddr::from(([127, 0, 0, 1], base));
    for h in hs.iter().skip(1) {
        h.send(Cmd::Seeds(vec![seed]))?;
    }
    let t = Instant::now();
    loop {
        let mut ok = true;
        for h in &hs {
            if h.members().await?.len() < n - 1 {
                ok = false;
                break;
            }
        }
        if ok {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{n} instances did not converge on membership in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let polled = t.elapsed();
    let last = last_up.lock().unwrap_or_else(|p| p.into_inner()).iter().flatten().max().copied();
    let took = last.map_or(polled, |l| l.saturating_duration_since(t));
    println!("N={n} {}: membership converged in {:.2} s (by the last NodeUp; the poll saw it at {:.1} s)", label(sealed), took.as_secs_f64(), polled.as_secs_f64());
    Ok((hs, took))
}

/// Bytes sent by every instance so far (UDP and stream payloads, with the sealing's 43 bytes
/// a message when sealed); an instance that stopped answering is an error, not
/// a zero.
/// Messages sent (datagrams) and received (datagrams and stream messages) by every instance.
async fn messages(hs: &[GossipHandle]) -> Result<u64> {
    let mut total = 0;
    for h in hs {
        let s = h.stats().await.with_context(|| format!("gossip instance {} stopped answering", h.me.node))?;
        total += s.udp_sent + s.received;
    }
    Ok(total)
}

async fn bytes(hs: &[GossipHandle]) -> Result<u64> {
    let mut total = 0;
    for h in hs {
        let s = h.stats().await.with_context(|| format!("gossip instance {} stopped answering", h.me.node))?;
        total += s.udp_bytes + s.stream_bytes + s.sealing_bytes;
    }
    Ok(total)
}

fn label(sealed: bool) -> &'static str {
    if sealed {
        "sealed"
    } else {
        "unsealed"
    }
}

/// The CPU time this process has used (user and system), to the microsecond (None where it
/// cannot be read).
pub fn cpu_time() -> Option<Duration> {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    let d = |t: nix::sys::time::TimeVal| Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0)) + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0));
    Some(d(u.user_time()) + d(u.system_time()))
}

/// `burst`: after the trials, also measure a datagram's CPU cost in a burst (for
/// `--validate`; at a thousand instances on one core the burst is a storm of its own).
pub async fn dissemination(n: usize, trials: usize, base: u16, idle: Duration, sealed: bool, burst: bool) -> Result<Figures> {
    let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
    let downs = Arc::new(Mutex::new(HashMap::new()));
    let (hs, converged) = start_cluster(n, base, &seen, &downs, sealed).await?;
    for h in &hs {
        h.send(Cmd::Join("bench".into()))?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b0 = bytes(&hs).await?;
    let m0 = messages(&hs).await?;
    let c0 = cpu_time();
    tokio::time::sleep(idle).await;
    let idle_cpu = cpu_time().zip(c0).map(|(c1, c0)| c1.saturating_sub(c0).as_secs_f64() / idle.as_secs_f64());
    let idle_messages = messages(&hs).await?.saturating_sub(m0);
    let cpu_per_message_us = idle_cpu.filter(|_| idle_messages > 0).map(|c| c * idle.as_secs_f64() * 1e6 / idle_messages as f64);
    let idle_bps = (bytes(&hs).await? - b0) as f64 / n as f64 / idle.as_secs_f64();
    if let Some(c) = idle_cpu {
        println!("N={n} {}: idle CPU {:.1} % of a core ({:.3} % per instance)", label(sealed), c * 100.0, c * 100.0 / n as f64);
    }
    let b1 = bytes(&hs).await?;
    let t_start = Instant::now();
    let (mut times, mut incomplete) = (Vec::new(), 0);
    let mut rng = OWNERS_SEED;
    for k in 0..trials {
        let r = next_owner(&mut rng, n);
        let t0 = Instant::now();
        hs[r].send(Cmd::Set(Box::new(ep(k))))?;
        let id = format!("t{k}");
        let deadline = t0 + Duration::from_secs(10);
        loop {
            let done = {
                let s = seen.lock().unwrap_or_else(|p| p.into_inner());
                let arrivals: Vec<Instant> = (0..n).filter_map(|i| s.get(&(i, id.clone())).copied()).collect();
                (arrivals.len() == n).then(|| arrivals.into_iter().max().unwrap_or(t0))
            };
            if let Some(last) = done {
                times.push((last - t0).as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > deadline {
                incomplete += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // About one broadcast a second, as memberlist-bench paces its trials.
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed())).await;
    }
    let busy_bps = (bytes(&hs).await? - b1) as f64 / n as f64 / t_start.elapsed().as_secs_f64();
    let per_broadcast = (busy_bps - idle_bps) * t_start.elapsed().as_secs_f64() / trials as f64;
    // A burst: a change at every instance at once, so that every push and ack is in flight
    // together and the runtime has no time to park. What a datagram costs then (the code's
    // share included) is measured by CPU time, not by how long anything took.
    let burst_cpu_per_message_us = if burst {
        let idle_rate = (idle_cpu.unwrap_or(0.0), idle_messages as f64 / idle.as_secs_f64());
        let (m0, seen0, c0, t0) = (messages(&hs).await?, seen.lock().unwrap_or_else(|p| p.into_inner()).len(), cpu_time(), Instant::now());
        for (i, h) in hs.iter().enumerate() {
            h.send(Cmd::Set(Box::new(ep(trials + i))))?;
        }
        while seen.lock().unwrap_or_else(|p| p.into_inner()).len() < seen0 + n * n && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The last acknowledgements.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (c1, w) = (cpu_time(), t0.elapsed().as_secs_f64());
        let burst_messages = messages(&hs).await?.saturating_sub(m0) as f64 - idle_rate.1 * w;
        c1.zip(c0).filter(|_| burst_messages > 0.0).map(|(c1, c0)| (c1.saturating_sub(c0).as_secs_f64() - idle_rate.0 * w) * 1e6 / burst_messages)
    } else {
        None
    };
    println!(
        "RESULT swarmnet {} N={n} trials={trials} reached-all={}/{trials} p50={:.1} ms p99={:.1} ms max={:.1} ms payload bytes/node/s: broadcasting {:.0}, idle {:.0}; per broadcast above idle {:.0} B/node",
        label(sealed),
        trials - incomplete,
        pct(&mut times.clone(), 50.0),
        pct(&mut times.clone(), 99.0),
        pct(&mut times, 100.0),
        busy_bps,
        idle_bps,
        per_broadcast
    );
    for h in &hs {
        h.send(Cmd::Stop)?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(Figures {
        converged_s: converged.as_secs_f64(),
        p50_ms: pct(&mut times.clone(), 50.0),
        p99_ms: pct(&mut times, 99.0),
        reached_all: trials - incomplete,
        trials,
        idle_bps,
        busy_bps,
        cpu_per_message_us,
        burst_cpu_per_message_us,
    })
}

async fn failure_detection(n: usize, trials: usize, base: u16, sealed: bool) -> Result<()> {
    let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
    let downs = Arc::new(Mutex::new(HashMap::new()));
    let (hs, _) = start_cluster(n, base, &seen, &downs, sealed).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut alive: Vec<usize> = (0..n).collect();
    let mut times = Vec::new();
    for t in 0..trials {
        let victim = alive[1 + (t * 7) % (alive.len() - 1)];
        alive.retain(|i| *i != victim);
        let t0 = Instant::now();
        hs[victim].send(Cmd::Stop)?;
        let name = format!("b{victim}");
        loop {
            let all = {
                let d = downs.lock().unwrap_or_else(|p| p.into_inner());
                alive.iter().map(|i| d.get(&(*i, name.clone())).copied()).collect::<Option<Vec<Instant>>>()
            };
            if let Some(ts) = all {
                times.push((ts.into_iter().max().unwrap_or(t0) - t0).as_secs_f64() * 1000.0);
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("node {name} not seen dead by everyone within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // False positives: a live node seen dead by anyone.
    let false_dead = downs.lock().unwrap_or_else(|p| p.into_inner()).keys().filter(|(_, node)| alive.iter().any(|i| format!("b{i}") == *node)).count();
    println!(
        "RESULT swarmnet {} failure detection N={n} trials={trials} everyone-sees-dead p50={:.0} ms p99={:.0} ms max={:.0} ms; live nodes wrongly declared dead: {false_dead}",
        label(sealed),
        pct(&mut times.clone(), 50.0),
        pct(&mut times.clone(), 99.0),
        pct(&mut times, 100.0)
    );
    for h in &hs {
        // The victims have stopped already.
        let _ = h.send(Cmd::Stop);
    }
    // The next run binds the same ports.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// `n` instances for `dur` with both cores kept busy by two spinning threads: how many live
/// nodes anyone declared dead (the goal is none).
pub fn bench_soak(n: usize, dur: Duration) -> Result<()> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let r = rt.block_on(async {
        let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
        let downs = Arc::new(Mutex::new(HashMap::new()));
        let (hs, _) = start_cluster(n, 27000, &seen, &downs, true).await?;
        let t = Instant::now();
        tokio::time::sleep(dur).await;
        let false_dead = downs.lock().unwrap_or_else(|p| p.into_inner()).len();
        let mut short = 0;
        for h in &hs {
            if h.members().await?.len() < n - 1 {
                short += 1;
            }
        }
        println!("RESULT swarmnet soak N={n} {:.0} s with both cores saturated: false dead declarations {false_dead}; nodes missing members at the end {short}", t.elapsed().as_secs_f64());
        for h in &hs {
            h.send(Cmd::Stop)?;
        }
        Ok::<(), anyhow::Error>(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    r
}

/// Failure detection alone.
pub fn bench_failure(n: usize, trials: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        failure_detection(n, trials, 26000, false).await?;
        failure_detection(n, trials, 26500, true).await
    })
}

/// What sealing costs at `n` instances: `rounds` alternating runs without and with it.
pub fn bench_gossip_seal(n: usize, trials: usize, rounds: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        for r in 0..rounds {
            for (k, sealed) in [false, true].into_iter().enumerate() {
                dissemination(n, trials, 21000 + 1000 * (2 * r + k) as u16, Duration::from_secs(10), sealed, false).await?;
            }
        }
        Ok(())
    })
}

pub fn bench_gossip(sizes: &[usize], trials: usize, idle: Duration, fail_n: usize, fail_trials: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        // Without and with sealing, one after the other at each size (issue 11).
        for (k, n) in sizes.iter().enumerate() {
            for sealed in [false, true] {
                // Ports of their own: a stopped instance's listener may linger a moment.
                dissemination(*n, trials, 21000 + 1000 * k as u16 + if sealed { 500 } else { 0 }, idle, sealed, false).await?;
            }
        }
        failure_detection(fail_n, fail_trials, 26000, false).await?;
        failure_detection(fail_n, fail_trials, 26500, true).await
    })
}
