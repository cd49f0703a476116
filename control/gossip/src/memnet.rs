//! Many `Gossip` nodes on an in-memory network with virtual time: links can be cut, nodes
//! crashed and restarted, UDP packets above the MTU are dropped. Seconds of protocol time
//! run in milliseconds, deterministically.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::{Config, Event, Gossip, Ident, Out};

struct Packet {
    from: usize,
    to: usize,
    data: Vec<u8>,
    stream: bool,
    /// An answer to a host probe of this node (not a packet of the protocol).
    probe_answer: Option<Ident>,
}

pub struct MemNet {
    pub nodes: Vec<Gossip>,
    addrs: Vec<SocketAddr>,
    crashed: Vec<bool>,
    /// The host of a crashed node still answers probes (its agent died, not the host).
    host_up: Vec<bool>,
    cfg: Config,
    pub now: Instant,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    packets: HashMap<u64, Packet>,
    seq: u64,
    cut: BTreeSet<(usize, usize)>,
    pub mtu: usize,
    pub latency: Duration,
    pub dropped_mtu: u64,
    pub events: Vec<(usize, Event)>,
    /// When set, every delivered packet is kept here (from, to, data, stream) for replays.
    pub record: bool,
    pub recorded: Vec<(usize, usize, Vec<u8>, bool)>,
}

pub fn addr_of(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 20000 + u16::try_from(i).unwrap_or(0)))
}

impl MemNet {
    pub fn new(n: usize, cfg: Config) -> MemNet {
        let now = Instant::now();
        let addrs: Vec<SocketAddr> = (0..n).map(addr_of).collect();
        let nodes = (0..n).map(|i| Gossip::new(Ident::new(format!("n{i}"), addrs[i], 1), cfg.clone(), i as u64 + 1, now)).collect();
        MemNet {
            nodes,
            addrs,
            crashed: vec![false; n],
            host_up: vec![true; n],
            cfg,
            now,
            queue: BinaryHeap::new(),
            packets: HashMap::new(),
            seq: 0,
            cut: BTreeSet::new(),
            mtu: 1400,
            latency: Duration::from_micros(200),
            dropped_mtu: 0,
            events: Vec::new(),
            record: false,
            recorded: Vec::new(),
        }
    }

    /// Every node announces itself to node 0.
    pub fn join_all(&mut self) {
        let seed = [self.addrs[0]];
        for i in 1..self.nodes.len() {
            self.nodes[i].join_via(&seed, self.now);
            self.collect(i);
        }
    }

    fn index(&self, a: SocketAddr) -> Option<usize> {
        self.addrs.iter().position(|x| *x == a)
    }

    fn collect(&mut self, i: usize) {
        for o in self.nodes[i].take_out() {
            let (to, data, stream) = match o {
                Out::Udp { to, data } => (to, data, false),
                Out::Stream { to, data } => (to, data, true),
                Out::Probe { node } => {
                    let Some(j) = self.index(node.addr) else { continue };
                    if !self.cut.contains(&(i, j)) && (!self.crashed[j] || self.host_up[j]) {
                        self.seq += 1;
                        self.queue.push(Reverse((self.now + 2 * self.latency, self.seq)));
                        self.packets.insert(self.seq, Packet { from: j, to: i, data: Vec::new(), stream: false, probe_answer: Some(node) });
                    }
                    continue;
                }
            };
            let Some(j) = self.index(to) else { continue };
            if self.cut.contains(&(i, j)) || self.crashed[j] || self.crashed[i] {
                continue;
            }
            if !stream && data.len() > self.mtu {
                self.dropped_mtu += 1;
                continue;
            }
            self.seq += 1;
            self.queue.push(Reverse((self.now + self.latency, self.seq)));
            self.packets.insert(self.seq, Packet { from: i, to: j, data, stream, probe_answer: None });
        }
        for e in self.nodes[i].take_events() {
            self.events.push((i, e));
        }
    }

    /// Advances virtual time by `d`, delivering packets and firing timers in order.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next_packet = self.queue.peek().map(|Reverse((t, _))| *t);
            let next_timer = (0..self.nodes.len()).filter(|i| !self.crashed[*i]).map(|i| self.nodes[i].next_deadline()).min();
            let next = [next_packet, next_timer].into_iter().flatten().min();
            let Some(t) = next.filter(|t| *t <= end) else {
                self.now = end;
                return;
            };
            self.now = self.now.max(t);
            if next_packet == Some(t) {
                if let Some(Reverse((_, seq))) = self.queue.pop() {
                    if let Some(p) = self.packets.remove(&seq) {
                        if let Some(id) = p.probe_answer {
                            if !self.crashed[p.to] {
                                self.nodes[p.to].host_alive(&id, self.now);
                                self.collect(p.to);
                            }
                        } else if !self.crashed[p.to] && !self.cut.contains(&(p.from, p.to)) {
                            if self.record {
                                self.recorded.push((p.from, p.to, p.data.clone(), p.stream));
                            }
                            let from = self.addrs[p.from];
                            self.nodes[p.to].handle(from, &p.data, p.stream, self.now);
                            self.collect(p.to);
                        }
                    }
                }
            } else {
                for i in 0..self.nodes.len() {
                    if !self.crashed[i] && self.nodes[i].next_deadline() <= self.now {
                        self.nodes[i].tick(self.now);
                        self.collect(i);
                    }
                }
            }
        }
    }

    /// Runs until `f` holds (checked every 10 ms of virtual time); the time it took.
    pub fn run_until(&mut self, limit: Duration, mut f: impl FnMut(&MemNet) -> bool) -> Option<Duration> {
        let start = self.now;
        while self.now - start < limit {
            if f(self) {
                return Some(self.now - start);
            }
            self.run_for(Duration::from_millis(10));
        }
        f(self).then(|| self.now - start)
    }

    /// Lets `i` act (publish, join a network) and sends what it produced.
    pub fn with(&mut self, i: usize, f: impl FnOnce(&mut Gossip, Instant)) {
        let now = self.now;
        f(&mut self.nodes[i], now);
        self.collect(i);
    }

    pub fn cut(&mut self, a: usize, b: usize) {
        self.cut.insert((a, b));
        self.cut.insert((b, a));
    }

    pub fn heal(&mut self, a: usize, b: usize) {
        self.cut.remove(&(a, b));
        self.cut.remove(&(b, a));
    }

    pub fn isolate(&mut self, i: usize) {
        for j in 0..self.nodes.len() {
            if j != i {
                self.cut(i, j);
            }
        }
    }

    pub fn rejoin(&mut self, i: usize) {
        for j in 0..self.nodes.len() {
            if j != i {
                self.heal(i, j);
            }
        }
    }

    /// Stops node `i` dead (no goodbye), its host with it: probes of it go unanswered.
    pub fn crash(&mut self, i: usize) {
        self.crashed[i] = true;
        self.host_up[i] = false;
    }

    /// Stops node `i`'s agent (no goodbye); its host still answers probes.
    pub fn kill_agent(&mut self, i: usize) {
        self.crashed[i] = true;
        self.host_up[i] = true;
    }

    /// Starts node `i` again, with a new generation and an empty table, joining via node 0
    /// (or node 1 if it is node 0).
    pub fn restart(&mut self, i: usize) {
        let gen = self.nodes[i].me().gen + 1;
        let id = Ident::new(format!("n{i}"), self.addrs[i], gen);
        self.nodes[i] = Gossip::new(id, self.cfg.clone(), gen * 1000 + i as u64, self.now);
        self.crashed[i] = false;
        self.host_up[i] = true;
        let seed = [self.addrs[if i == 0 { 1 } else { 0 }]];
        self.nodes[i].join_via(&seed, self.now);
        self.collect(i);
    }

    /// Delivers raw bytes to node `i` as if from node `from`.
    pub fn inject(&mut self, from: usize, i: usize, data: &[u8], stream: bool) {
        let a = self.addrs[from];
        self.nodes[i].handle(a, data, stream, self.now);
        self.collect(i);
    }
}
