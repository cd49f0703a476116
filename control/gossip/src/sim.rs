//! A simulator of the real gossip core (issue 23): many [`Gossip`] instances, the very code
//! the agent runs, driven in virtual time over a network model. Latency is drawn per packet
//! from a range, datagrams are lost at a given rate (streams are reliable, as TCP is), the
//! nodes can be split into partitions, crashed and restarted, and a node's clock can run
//! ahead or behind. Built to scale where [`crate::memnet`] does not: the next timer comes
//! from a heap (not a scan of every node), addresses map to nodes through a hash map, and
//! nothing is kept per packet once it is delivered. Deterministic for a given seed with
//! [`Cpu::Free`].
//!
//! **CPU.** With [`Cpu::Free`] a node's work takes no virtual time. With [`Cpu::PerNode`]
//! (each node its own machine) or [`Cpu::Shared`] (every node in one process on K cores, as
//! `cargo xtask bench gossip` runs the real server), the real time the real code took for
//! each packet and timer (its sealing and opening included when `sealed`) is charged in
//! virtual time: a node does one thing at a time, the machine K at once, and what it sends
//! leaves when it is done. Two measured costs of the system come on top (see `swarmnet-sim`'s
//! calibration): each datagram sent or received ([`NetModel::per_message`]), and the wake-up
//! of a parked worker when something arrives while a core is idle ([`NetModel::wake`]); a
//! busy runtime takes the next message without one. That is what lets the simulator be
//! checked against the real processes' figures.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

use crate::{Config, Event, Gossip, Ident, Out};

/// The network between the simulated nodes, and the machines they run on.
#[derive(Clone, Debug)]
pub struct NetModel {
    /// One-way latency of a packet, drawn uniformly from this range.
    pub latency: (Duration, Duration),
    /// Probability that a datagram is lost (streams are never lost: TCP retransmits).
    pub loss: f64,
    /// Datagrams larger than this are dropped (what the underlay would do).
    pub mtu: usize,
    pub cpu: Cpu,
    /// Seal every packet and open it again (as the server does with the cluster's key), so
    /// that its cost is charged too.
    pub sealed: bool,
    /// What the system costs a node per message sent and per message received, beyond its
    /// own code (the send and receive calls and the runtime's share, on a busy runtime):
    /// charged with the work when the CPU is modelled. Measured, not guessed: see
    /// `swarmnet-sim`'s calibration.
    pub per_message: Duration,
    /// How long a parked worker takes to start on what arrives (a packet, a timer) while a
    /// core is idle: charged when the CPU is modelled, before the work and on the core that
    /// takes it (what arrives meanwhile waits for that worker too). A node that is busy, or
    /// a machine whose cores all are, takes it without one.
    pub wake: Duration,
}

impl Default for NetModel {
    fn default() -> Self {
        NetModel { latency: (Duration::from_micros(200), Duration::from_micros(200)), loss: 0.0, mtu: 1400, cpu: Cpu::Free, sealed: false, per_message: Duration::ZERO, wake: Duration::ZERO }
    }
}

/// What a node's work costs in virtual time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cpu {
    /// Nothing: deterministic.
    Free,
    /// The real time the code took, each node on a machine of its own.
    PerNode,
    /// The real time the code took, every node sharing this many cores.
    Shared(usize),
}

/// The gossip address of simulated node `i` (10.x.y.z:7946, room for 16 million).
pub fn addr_of(i: usize) -> SocketAddr {
    let i = u32::try_from(i).unwrap_or(u32::MAX) & 0x00ff_ffff;
    SocketAddr::from((Ipv4Addr::from(0x0a00_0000 | i), 7946))
}

/// What the network did with the packets it was given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub delivered: u64,
    pub lost: u64,
    pub partitioned: u64,
    pub oversized: u64,
    /// Host probes (a TCP connect in the real server) answered.
    pub probes_answered: u64,
}

enum Payload {
    Data { data: Vec<u8>, stream: bool },
    ProbeAnswer(Ident),
}

struct Packet {
    from: usize,
    to: usize,
    payload: Payload,
}

/// Called for every event of every node: (node, event, virtual time). Events are not kept
/// (10,000 nodes learning of 10,000 members are 100 million of them).
pub type Observer = Box<dyn FnMut(usize, &Event, Instant)>;

pub struct Sim {
    pub nodes: Vec<Gossip>,
    index: HashMap<SocketAddr, usize>,
    cfg: Config,
    pub model: NetModel,
    pub now: Instant,
    rng: StdRng,
    /// Partition of each node: packets between different partitions are dropped.
    group: Vec<u32>,
    /// Crashed: neither its agent nor its host answers.
    down: Vec<bool>,
    /// How far each node's clock is off the true (virtual) time, in either direction.
    skew: Vec<(bool, Duration)>,
    packets: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: HashMap<u64, Packet>,
    /// (when, node): a node's next deadline as it was after it last acted; stale entries
    /// (the node's deadline moved) are skipped when popped.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Each node's earliest wake-up in `timers` (None: none queued). A later deadline is
    /// not queued while an earlier wake-up is (that one queues it when it pops): a queue
    /// entry for every action of every node made the heap millions long.
    queued: Vec<Option<Instant>>,
    seq: u64,
    pub net: NetStats,
    observer: Option<Observer>,
    /// When each node is done with what it is doing (`Cpu::PerNode`, `Cpu::Shared`).
    busy: Vec<Instant>,
    /// When each core is free (`Cpu::Shared`).
    cores: BinaryHeap<Reverse<Instant>>,
    keys: Option<crate::seal::Keyring>,
    start: Instant,
    /// Real time spent in the nodes' code (charged or not).
    pub work: Duration,
    /// Bytes the sealing added to what was sent.
    pub sealing_bytes: u64,
    /// Streams (bulk messages over TCP) in flight now, and at most so far: how many syncs
    /// run at once.
    streams: usize,
    pub max_streams: usize,
    /// Bytes of the messages in flight now, and at most so far: memory the simulator holds
    /// for the network (in a real cluster, socket buffers spread over the machines).
    in_flight_bytes: usize,
    pub max_in_flight_bytes: usize,
    /// Asked every 4,096 events: true stops the run where it is (a runner's budget of real
    /// time or memory, which one step of virtual time can otherwise blow through).
    pub abort: Option<fn() -> bool>,
    /// `abort` said so: nothing runs any more.
    pub aborted: bool,
    events_run: u64,
}

impl Sim {
    /// `n` nodes, not yet introduced to each other (see [`Sim::join_all`]).
    pub fn new(n: usize, cfg: Config, model: NetModel, seed: u64) -> Sim {
        let now = Instant::now();
        let nodes: Vec<Gossip> = (0..n).map(|i| Gossip::new(Ident::new(format!("n{i}"), addr_of(i), 1), cfg.clone(), seed.wrapping_mul(1_000_003).wrapping_add(i as u64 + 1), now)).collect();
        let index = (0..n).map(|i| (addr_of(i), i)).collect();
        let cores = match model.cpu {
            Cpu::Shared(k) => (0..k.max(1)).map(|_| Reverse(now)).collect(),
            _ => BinaryHeap::new(),
        };
        let keys = if model.sealed {
            let mut key = [0u8; 32];
            StdRng::seed_from_u64(seed).fill_bytes(&mut key);
            crate::seal::Keyring::new(&[(1, key)]).ok()
        } else {
            None
        };
        let mut s = Sim {
            nodes,
            index,
            cfg,
            model,
            now,
            rng: StdRng::seed_from_u64(seed ^ 0x51_6d),
            group: vec![0; n],
            down: vec![false; n],
            skew: vec![(true, Duration::ZERO); n],
            packets: BinaryHeap::new(),
            in_flight: HashMap::new(),
            timers: BinaryHeap::new(),
            queued: vec![None; n],
            seq: 0,
            net: NetStats::default(),
            observer: None,
            busy: vec![now; n],
            cores,
            keys,
            start: now,
            work: Duration::ZERO,
            sealing_bytes: 0,
            streams: 0,
            max_streams: 0,
            in_flight_bytes: 0,
            max_in_flight_bytes: 0,
            abort: None,
            aborted: false,
            events_run: 0,
        };
        for i in 0..n {
            let now = s.now;
            s.flush(i, now, Duration::ZERO);
        }
        s
    }

    pub fn observe(&mut self, f: Observer) {
        self.observer = Some(f);
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s clock at true (virtual) time `t`.
    fn clock_at(&self, i: usize, t: Instant) -> Instant {
        match self.skew[i] {
            (true, d) => t + d,
            (false, d) => t.checked_sub(d).unwrap_or(t),
        }
    }

    /// Sets node `i`'s clock `d` ahead (`ahead`) or behind the others. Call before the node
    /// has timers far in the future (at the start), since its deadlines are in its time.
    pub fn skew_clock(&mut self, i: usize, ahead: bool, d: Duration) {
        self.skew[i] = (ahead, d);
        self.schedule(i);
    }

    /// The true time of node `i`'s clock reading `t`.
    fn true_time(&self, i: usize, t: Instant) -> Instant {
        match self.skew[i] {
            (true, d) => t.checked_sub(d).unwrap_or(t),
            (false, d) => t + d,
        }
    }

    fn schedule(&mut self, i: usize) {
        let t = self.true_time(i, self.nodes[i].next_deadline()).max(self.now);
        if self.queued[i].is_some_and(|q| q <= t) {
            return;
        }
        self.queued[i] = Some(t);
        self.timers.push(Reverse((t, i)));
    }

    fn latency(&mut self) -> Duration {
        let (lo, hi) = self.model.latency;
        if hi <= lo {
            return lo;
        }
        let span = u64::try_from((hi - lo).as_nanos()).unwrap_or(u64::MAX);
        lo + Duration::from_nanos(self.rng.random_range(0..=span))
    }

    fn send(&mut self, from: usize, to: usize, payload: Payload, at: Instant) {
        if matches!(payload, Payload::Data { stream: true, .. }) {
            self.streams += 1;
            self.max_streams = self.max_streams.max(self.streams);
        }
        if let Payload::Data { data, .. } = &payload {
            self.in_flight_bytes += data.len();
            self.max_in_flight_bytes = self.max_in_flight_bytes.max(self.in_flight_bytes);
        }
        self.seq += 1;
        self.packets.push(Reverse((at, self.seq)));
        self.in_flight.insert(self.seq, Packet { from, to, payload });
    }

    fn ms(&self) -> u64 {
        u64::try_from(self.now.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX)
    }

    fn seal(&mut self, data: Vec<u8>) -> Vec<u8> {
        let sealed = match &self.keys {
            Some(k) => k.seal(&data, self.ms()).ok(),
            None => None,
        };
        match sealed {
            Some(x) => {
                self.sealing_bytes += x.len().saturating_sub(data.len()) as u64;
                x
            }
            None => data,
        }
    }

    /// When node `i` can start on something that arrives at `t`: once its own work is done
    /// and (shared cores) a core is free. What finds the node idle and a core idle waits
    /// for a worker to wake up; a node still at work, or a machine whose cores are all
    /// busy, takes it as soon as it is free, with no wake-up.
    fn ready_at(&self, i: usize, t: Instant) -> Instant {
        let core = match self.model.cpu {
            Cpu::Free => return t,
            Cpu::PerNode => t,
            Cpu::Shared(_) => self.cores.peek().map_or(t, |Reverse(c)| *c),
        };
        if self.busy[i] > t || core > t {
            self.busy[i].max(core).max(t)
        } else {
            t + self.model.wake
        }
    }

    /// Node `i` does `f` for something that arrived at `t`: it starts when it is free (see
    /// [`Sim::ready_at`]), at its clock then; what its code took (and `extra`, work done
    /// for it before, such as opening a packet) is charged from there, and what it sends
    /// leaves when it is done. Every action runs once, in arrival order: a busy node's
    /// actions queue behind each other (a node's clock never goes back), a machine's cores
    /// are taken first come, first served.
    fn work(&mut self, i: usize, t: Instant, extra: Duration, f: impl FnOnce(&mut Gossip, Instant)) {
        let start = self.ready_at(i, t);
        let at = self.clock_at(i, start);
        let t0 = Instant::now();
        f(&mut self.nodes[i], at);
        let took = t0.elapsed() + extra;
        self.flush(i, start, took);
    }

    /// Sends what node `i` produced (sealed, when sealing: that is charged too) and hands on
    /// its events, charging `took` from `start`; schedules its next timer.
    fn flush(&mut self, i: usize, start: Instant, took: Duration) {
        let t0 = Instant::now();
        let mut sends = Vec::new();
        for o in self.nodes[i].take_out() {
            match o {
                Out::Probe { node } => {
                    let Some(&j) = self.index.get(&node.addr) else { continue };
                    // A TCP connect: answered if the host is up and reachable.
                    if self.group[i] == self.group[j] && !self.down[j] {
                        let d = self.latency() + self.latency();
                        sends.push((j, i, Payload::ProbeAnswer(node), d));
                    }
                }
                Out::Udp { to, data } => {
                    let Some(&j) = self.index.get(&to) else { continue };
                    if data.len() > self.model.mtu {
                        self.net.oversized += 1;
                        continue;
                    }
                    let data = self.seal(data);
                    if self.model.loss > 0.0 && self.rng.random_bool(self.model.loss.min(1.0)) {
                        self.net.lost += 1;
                        continue;
                    }
                    let d = self.latency();
                    sends.push((i, j, Payload::Data { data, stream: false }, d));
                }
                Out::Stream { to, data } => {
                    let Some(&j) = self.index.get(&to) else { continue };
                    // A connection and the message: one round trip and a half.
                    let d = self.latency() + self.latency() + self.latency();
                    let data = self.seal(data);
                    sends.push((i, j, Payload::Data { data, stream: true }, d));
                }
            }
        }
        let sealing = if self.keys.is_some() { t0.elapsed() } else { Duration::ZERO };
        let sealing = sealing + self.model.per_message * u32::try_from(sends.len()).unwrap_or(u32::MAX);
        self.work += took + sealing;
        let done = if self.model.cpu == Cpu::Free {
            start
        } else {
            let done = start + took + sealing;
            self.busy[i] = done;
            if let Cpu::Shared(_) = self.model.cpu {
                self.cores.pop();
                self.cores.push(Reverse(done));
            }
            done
        };
        for (from, to, payload, d) in sends {
            self.send(from, to, payload, done + d);
        }
        let events = self.nodes[i].take_events();
        if let Some(f) = self.observer.as_mut() {
            for e in &events {
                f(i, e, done);
            }
        }
        self.schedule(i);
    }

    fn deliver(&mut self, p: Packet) {
        if self.down[p.to] {
            return;
        }
        if self.group[p.from] != self.group[p.to] {
            self.net.partitioned += 1;
            return;
        }
        let (to, now) = (p.to, self.now);
        match p.payload {
            Payload::ProbeAnswer(id) => {
                self.net.probes_answered += 1;
                self.work(to, now, Duration::ZERO, |g, at| g.host_alive(&id, at));
            }
            Payload::Data { data, stream } => {
                self.net.delivered += 1;
                let from = addr_of(p.from);
                let t0 = Instant::now();
                let plain = match &self.keys {
                    Some(k) => k.open(&data, self.ms()).ok(),
                    None => Some(data),
                };
                let opening = t0.elapsed() + self.model.per_message;
                if let Some(plain) = plain {
                    self.work(to, now, opening, |g, at| g.handle(from, &plain, stream, at));
                }
            }
        }
    }

    /// Advances virtual time by `d`, delivering packets and firing timers in order.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            if self.aborted {
                return;
            }
            self.events_run += 1;
            if self.events_run.is_multiple_of(4096) && self.abort.is_some_and(|f| f()) {
                self.aborted = true;
                return;
            }
            let next_packet = self.packets.peek().map(|Reverse((t, _))| *t);
            let next_timer = self.timers.peek().map(|Reverse((t, _))| *t);
            let Some(t) = [next_packet, next_timer].into_iter().flatten().min().filter(|t| *t <= end) else {
                self.now = end;
                return;
            };
            self.now = self.now.max(t);
            if next_packet == Some(t) {
                if let Some(Reverse((_, seq))) = self.packets.pop() {
                    if let Some(p) = self.in_flight.remove(&seq) {
                        if let Payload::Data { data, stream } = &p.payload {
                            self.streams -= usize::from(*stream);
                            self.in_flight_bytes -= data.len();
                        }
                        self.deliver(p);
                    }
                }
            } else if let Some(Reverse((t, i))) = self.timers.pop() {
                if self.queued[i] != Some(t) {
                    // Stale: an earlier wake-up was queued after this one.
                    continue;
                }
                self.queued[i] = None;
                if self.down[i] {
                    continue;
                }
                let due = self.true_time(i, self.nodes[i].next_deadline());
                if due > self.now {
                    // The node acted since: its deadline moved later.
                    self.schedule(i);
                    continue;
                }
                let now = self.now;
                self.work(i, now, Duration::ZERO, |g, at| g.tick(at));
            }
        }
    }

    /// Runs until `f` holds (checked every `step` of virtual time), at most `limit`; the
    /// virtual time it took.
    pub fn run_until(&mut self, limit: Duration, step: Duration, mut f: impl FnMut(&Sim) -> bool) -> Option<Duration> {
        let start = self.now;
        while self.now - start < limit && !self.aborted {
            if f(self) {
                return Some(self.now - start);
            }
            self.run_for(step);
        }
        f(self).then(|| self.now - start)
    }

    /// Every node announces itself to node 0 (as agents do to the manager's node list).
    pub fn join_all(&mut self) {
        self.join_range(0..self.nodes.len());
    }

    /// The nodes of `range` announce themselves to node 0 (node 0 itself does not).
    pub fn join_range(&mut self, range: std::ops::Range<usize>) {
        let seed = [addr_of(0)];
        let now = self.now;
        let n = self.nodes.len();
        for i in range.filter(|&i| i > 0 && i < n) {
            self.work(i, now, Duration::ZERO, |g, at| g.join_via(&seed, at));
        }
    }

    /// Lets node `i` act (publish, join a network) at its clock, once it is free, and sends
    /// what it produced.
    pub fn with(&mut self, i: usize, f: impl FnOnce(&mut Gossip, Instant)) {
        let now = self.now;
        self.work(i, now, Duration::ZERO, f);
    }

    /// Every live node has every other live node as a live member.
    pub fn converged(&self) -> bool {
        self.not_converged() == 0
    }

    /// Nodes whose member count is short of every live other.
    pub fn not_converged(&self) -> usize {
        let live = self.down.iter().filter(|d| !**d).count();
        self.nodes.iter().enumerate().filter(|(i, g)| !self.down[*i] && g.member_count() + 1 < live).count()
    }

    /// Puts node `i` in partition `g` (all start in 0).
    pub fn set_partition(&mut self, i: usize, g: u32) {
        self.group[i] = g;
    }

    /// Everyone back in one partition.
    pub fn heal(&mut self) {
        self.group.iter_mut().for_each(|g| *g = 0);
    }

    /// Node `i` and its host stop dead (no goodbye).
    pub fn crash(&mut self, i: usize) {
        self.down[i] = true;
    }

    pub fn is_down(&self, i: usize) -> bool {
        self.down[i]
    }

    /// Starts node `i` again, with a new generation and an empty table, joining via `seed`.
    pub fn restart(&mut self, i: usize, seed: usize) {
        let gen = self.nodes[i].me().gen + 1;
        let id = Ident::new(format!("n{i}"), addr_of(i), gen);
        let now = self.now;
        let at = self.clock_at(i, now);
        self.nodes[i] = Gossip::new(id, self.cfg.clone(), gen.wrapping_mul(1_000_003) ^ i as u64, at);
        self.down[i] = false;
        self.busy[i] = now;
        let seed = [addr_of(seed)];
        self.work(i, now, Duration::ZERO, |g, at| g.join_via(&seed, at));
    }

    /// Bytes every node has sent so far (datagrams and streams, and what sealing added),
    /// summed.
    pub fn bytes_sent(&self) -> u64 {
        self.nodes.iter().map(|g| g.stats.udp_bytes + g.stats.stream_bytes).sum::<u64>() + self.sealing_bytes
    }

    /// Streams (bulk messages over TCP) in flight now: how many syncs run at once.
    pub fn streams_in_flight(&self) -> usize {
        self.streams
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarmnet_types::{Endpoint, EndpointState};

    fn ep(owner: usize) -> Endpoint {
        Endpoint {
            network: "net".into(),
            id: format!("t{owner}"),
            task_name: format!("web.{owner}"),
            service_name: "web".into(),
            service_id: "svc".into(),
            aliases: vec![],
            ip: Ipv4Addr::new(10, 1, 0, 2),
            mac: [2, 0x42, 10, 1, 0, 2],
            vtep: std::net::IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)),
            vip: None,
            ports: vec![],
            state: EndpointState::Active,
        }
    }

    #[test]
    fn addresses_are_distinct_past_65536_nodes() {
        assert_ne!(addr_of(1), addr_of(65_537));
        assert_eq!(addr_of(0), SocketAddr::from(([10, 0, 0, 0], 7946)));
        assert_eq!(addr_of(70_000), SocketAddr::from(([10, 1, 0x11, 0x70], 7946)));
    }

    #[test]
    fn fifty_nodes_converge_and_spread_a_change_over_a_lossy_network() {
        let model = NetModel { latency: (Duration::from_millis(1), Duration::from_millis(20)), loss: 0.01, ..NetModel::default() };
        let mut s = Sim::new(50, Config::default(), model, 7);
        s.join_all();
        assert!(s.run_until(Duration::from_secs(60), Duration::from_millis(100), Sim::converged).is_some(), "not converged: {} nodes short", s.not_converged());
        for i in 0..50 {
            s.with(i, |g, now| g.join_network("net", now));
        }
        s.run_for(Duration::from_secs(2));
        s.with(3, |g, now| g.set_endpoint(ep(3), now));
        let took = s.run_until(Duration::from_secs(30), Duration::from_millis(10), |s| s.nodes.iter().all(|g| g.table().get("net", "t3").is_some()));
        assert!(took.is_some(), "the change reached every node");
        assert!(s.net.lost > 0, "the model lost datagrams: {:?}", s.net);
    }

    #[test]
    fn suspicions_refuted_under_heavy_loss_kill_no_one() {
        // 10 % loss: probes fail now and then and their members are suspected; each refutes
        // in time. foca used to tell a refuted member it was down all the same (its timer
        // fired on the old suspicion), and the member rejoined as a new generation: the
        // cluster saw a death (ADR 0034).
        let model = NetModel { latency: (Duration::from_millis(1), Duration::from_millis(20)), loss: 0.01, ..NetModel::default() };
        let mut s = Sim::new(60, Config::default(), model, 3);
        s.join_all();
        assert!(s.run_until(Duration::from_secs(60), Duration::from_millis(100), Sim::converged).is_some(), "{} nodes short", s.not_converged());
        s.model.loss = 0.10;
        s.run_for(Duration::from_secs(20));
        let sum = |f: fn(&crate::Stats) -> u64| s.nodes.iter().map(|g| f(&g.stats)).sum::<u64>();
        assert!(sum(|x| x.suspicions) > 0, "the loss raised suspicions");
        assert!(sum(|x| x.refutations) > 0, "suspected members refuted");
        assert_eq!(0, sum(|x| x.suspicions_to_death), "no timer declared a death");
        assert_eq!(0, sum(|x| x.failures_detected), "no member declared down");
        assert_eq!(0, sum(|x| x.rejoins) + sum(|x| x.renewals), "no node rejoined");
    }

    #[test]
    fn lost_pushes_are_sent_again_until_acknowledged() {
        // A third of all datagrams lost: a change reaches every node by retransmission,
        // well before anti-entropy (10 s) could bring it.
        let mut s = Sim::new(30, Config::default(), NetModel::default(), 11);
        s.join_all();
        assert!(s.run_until(Duration::from_secs(60), Duration::from_millis(100), Sim::converged).is_some(), "{} nodes short", s.not_converged());
        for i in 0..30 {
            s.with(i, |g, now| g.join_network("net", now));
        }
        s.run_for(Duration::from_secs(2));
        // Round trips of 0.4 ms measured: pushes wait the least time for their acks.
        assert_eq!(s.nodes[7].retransmit_timeout(), Config::default().min_retransmit);
        s.model.loss = 0.33;
        s.with(7, |g, now| g.set_endpoint(ep(7), now));
        let took = s.run_until(Duration::from_secs(5), Duration::from_millis(10), |s| s.nodes.iter().all(|g| g.table().get("net", "t7").is_some()));
        let took = took.unwrap_or_else(|| panic!("{} nodes lack the change", s.nodes.iter().filter(|g| g.table().get("net", "t7").is_none()).count()));
        assert!(took < Duration::from_secs(1), "took {took:?}");
        assert!(s.nodes[7].stats.retransmitted > 0, "{:?}", s.nodes[7].stats);
        s.model.loss = 0.0;
        s.run_for(Duration::from_secs(3));
        assert_eq!(s.nodes[7].unacked(), 0, "every push acknowledged or given up");
    }

    #[test]
    fn a_join_storm_runs_a_bounded_number_of_exchanges_per_node() {
        let cfg = Config::default();
        let cap = cfg.max_syncs;
        let mut s = Sim::new(300, cfg, NetModel { latency: (Duration::from_millis(1), Duration::from_millis(20)), ..NetModel::default() }, 5);
        s.join_all();
        let mut most = 0;
        let mut deferred = 0;
        let converged = s.run_until(Duration::from_secs(120), Duration::from_millis(5), |s| {
            most = most.max(s.nodes.iter().map(Gossip::syncs_running).max().unwrap_or(0));
            s.converged()
        });
        for g in &s.nodes {
            deferred += g.stats.syncs_deferred;
        }
        assert!(converged.is_some(), "{} nodes short", s.not_converged());
        assert!(most <= cap, "{most} exchanges running on one node (cap {cap})");
        assert!(deferred > 0, "the cap was never reached: the test shows nothing");
        assert_eq!(s.net.oversized, 0, "every datagram fits the underlay's packet");
    }

    #[test]
    fn a_partition_heals_and_a_crash_is_seen() {
        let mut s = Sim::new(20, Config::default(), NetModel::default(), 1);
        s.join_all();
        assert!(s.run_until(Duration::from_secs(30), Duration::from_millis(100), Sim::converged).is_some());
        for i in 10..20 {
            s.set_partition(i, 1);
        }
        s.run_for(Duration::from_secs(10));
        assert!(s.nodes[0].members().count() < 19, "the other half was declared down");
        s.heal();
        assert!(s.run_until(Duration::from_secs(60), Duration::from_millis(100), Sim::converged).is_some(), "healed: {} nodes short", s.not_converged());
        s.crash(5);
        let seen = s.run_until(Duration::from_secs(30), Duration::from_millis(50), |s| s.nodes.iter().enumerate().all(|(i, g)| i == 5 || !g.members().any(|m| m.node == "n5")));
        assert!(seen.is_some(), "every live node saw the crash");
        s.restart(5, 0);
        assert!(s.run_until(Duration::from_secs(60), Duration::from_millis(100), Sim::converged).is_some(), "the restarted node is back");
    }

    #[test]
    fn sealed_work_on_one_shared_core_is_charged_in_virtual_time() {
        let model = NetModel { cpu: Cpu::Shared(1), sealed: true, ..NetModel::default() };
        let mut s = Sim::new(30, Config::default(), model, 5);
        s.join_all();
        assert!(s.run_until(Duration::from_secs(60), Duration::from_millis(100), Sim::converged).is_some(), "{} nodes short", s.not_converged());
        assert!(s.work > Duration::ZERO);
        for i in 0..30 {
            s.with(i, |g, now| g.join_network("net", now));
        }
        s.run_for(Duration::from_secs(2));
        let start = s.now;
        s.with(0, |g, now| g.set_endpoint(ep(0), now));
        let took = s.run_until(Duration::from_secs(30), Duration::from_micros(100), |s| s.nodes.iter().all(|g| g.table().get("net", "t0").is_some())).expect("the change reached every node");
        // 29 sealed datagrams leave one after another, then each is opened on the one core.
        assert!(took > Duration::from_micros(200), "the work took virtual time: {took:?} after {:?}", s.now - start);
    }

    #[test]
    fn a_wake_up_is_charged_only_when_the_node_and_a_core_are_idle() {
        let ms = Duration::from_millis;
        let model = NetModel { cpu: Cpu::Shared(1), wake: ms(1), ..NetModel::default() };
        let mut s = Sim::new(2, Config::default(), model, 1);
        let t = s.now + Duration::from_secs(1);
        assert_eq!(s.ready_at(0, t), t + ms(1), "an idle machine wakes a worker");
        // The one core at another node's work until t + 3 ms: no wake-up, the core's turn.
        s.cores.clear();
        s.cores.push(Reverse(t + ms(3)));
        assert_eq!(s.ready_at(0, t), t + ms(3));
        // The node itself still at work, a core free: its own turn.
        s.cores.clear();
        s.cores.push(Reverse(t));
        s.busy[1] = t + ms(2);
        assert_eq!(s.ready_at(1, t), t + ms(2));
        // Nothing is charged without a CPU model.
        let mut free = Sim::new(2, Config::default(), NetModel { wake: ms(1), ..NetModel::default() }, 1);
        let t = free.now + Duration::from_secs(1);
        free.busy[0] = t + ms(5);
        assert_eq!(free.ready_at(0, t), t);
    }

    #[test]
    fn a_node_whose_clock_is_50_s_ahead_still_joins() {
        let mut s = Sim::new(10, Config::default(), NetModel::default(), 3);
        s.skew_clock(4, true, Duration::from_secs(50));
        s.join_all();
        assert!(s.run_until(Duration::from_secs(30), Duration::from_millis(100), Sim::converged).is_some(), "{} nodes short", s.not_converged());
    }

    #[test]
    fn datagrams_over_the_mtu_are_dropped_and_counted() {
        let model = NetModel { mtu: 10, ..NetModel::default() };
        let mut s = Sim::new(3, Config::default(), model, 1);
        s.join_all();
        s.run_for(Duration::from_secs(2));
        assert!(s.net.oversized > 0, "{:?}", s.net);
        assert!(!s.converged(), "nothing fits in 10 bytes");
    }
}
