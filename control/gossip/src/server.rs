//! The gossip server loop (tokio): owns the UDP and TCP sockets on port 7946 and the timers, and
//! drives the sans-IO `swarmnet_gossip::Gossip`. The rest of the agent talks to it through a
//! `GossipHandle`: commands in, a broadcast of table changes out (the stream the agent's follow
//! loop reads for every sink).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::seal::{self, Keyring, ReplayGuard, Step, StreamReader, OVERHEAD};
use crate::{Config, Event, Gossip, Ident, Out, Stats, MAX_STREAM_MESSAGE};
use swarmnet_types::admission::{self, Admission, Limits, Names};
use swarmnet_types::Endpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{broadcast, mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

pub enum Cmd {
    /// Addresses to join through.
    Seeds(Vec<SocketAddr>),
    /// The manager's list of ready nodes: joins through them, and a member declared down
    /// that is not on it loses its entries at once (`Gossip::set_nodes`).
    Nodes(Vec<SocketAddr>),
    Leave(String),
    Set(Box<Endpoint>),
    Remove {
        network: String,
        id: String,
    },
    Endpoints {
        network: String,
        reply: oneshot::Sender<Vec<Arc<Endpoint>>>,
    },
    Members {
        reply: oneshot::Sender<Vec<Ident>>,
    },
    Join(String),
    Stats {
        reply: oneshot::Sender<Stats>,
    },
    /// The networks this node takes entries of.
    Networks {
        reply: oneshot::Sender<Vec<String>>,
    },
    /// The keys to seal and open with (from the manager). Until the first, nothing is sent
    /// and everything received is dropped.
    Keys(Box<Keyring>),
    /// Benchmarks only (`cargo xtask bench gossip`, what sealing costs): send and take
    /// plaintext, as before issue 11. No daemon sends this.
    Unsealed,
    /// Stops the loop and closes the sockets (benchmarks: a node that dies).
    Stop,
}

#[derive(Clone)]
pub struct GossipHandle {
    tx: mpsc::UnboundedSender<Cmd>,
    /// Only the loop holds the sender: when the loop ends (stopped, or a panic), every
    /// subscription sees the stream closed instead of silence.
    events: std::sync::Arc<broadcast::Receiver<Event>>,
    pub me: Ident,
}

/// The gossip loop is gone: nothing it would have answered can be known. Never take this
/// for "empty": a caller that did would wipe kernel state that is still right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the gossip loop has stopped")]
pub struct Stopped;

impl GossipHandle {
    pub fn send(&self, c: Cmd) -> Result<(), Stopped> {
        self.tx.send(c).map_err(|_| Stopped)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.resubscribe()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        rx.await.map_err(|_| Stopped)
    }

    pub async fn stats(&self) -> Result<Stats, Stopped> {
        self.ask(|reply| Cmd::Stats { reply }).await
    }

    /// Live members as this node's failure detector sees them (itself excluded).
    pub async fn members(&self) -> Result<Vec<Ident>, Stopped> {
        self.ask(|reply| Cmd::Members { reply }).await
    }

    /// The networks this node takes entries of.
    pub async fn networks(&self) -> Result<Vec<String>, Stopped> {
        self.ask(|reply| Cmd::Networks { reply }).await
    }

    /// The endpoints of `network` as this node's table holds them now.
    pub async fn endpoints(&self, network: &str) -> Result<Vec<Arc<Endpoint>>, Stopped> {
        self.ask(|reply| Cmd::Endpoints { network: network.to_string(), reply }).await
    }
}

/// Binds UDP and TCP on `me.addr` and starts the loop.
pub async fn start(me: Ident, cfg: Config) -> std::io::Result<GossipHandle> {
    let udp = UdpSocket::bind(me.addr).await.map_err(|e| std::io::Error::new(e.kind(), format!("gossip: bind udp {}: {e}", me.addr)))?;
    let tcp = TcpListener::bind(me.addr).await.map_err(|e| std::io::Error::new(e.kind(), format!("gossip: bind tcp {}: {e}", me.addr)))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let (events, template) = broadcast::channel(1024);
    let h = GossipHandle { tx, events: std::sync::Arc::new(template), me: me.clone() };
    let (stream_tx, stream_rx) = mpsc::channel::<Received>(256);
    let limits = Limits { total: cfg.max_streams, per_peer: cfg.max_streams_per_peer };
    let (keys, keys_rx) = watch::channel(Arc::new(Sealing::NoKey));
    let replays = Arc::new(std::sync::Mutex::new(ReplayGuard::default()));
    tokio::spawn(accept_streams(tcp, stream_tx, limits, Opener { keys: keys_rx, replays: replays.clone() }));
    let seed = me.gen ^ u64::from(me.addr.port());
    info!(node = %me.node, addr = %me.addr, gen = me.gen, "gossip listening");
    tokio::spawn(run(Gossip::new(me, cfg, seed, Instant::now()), udp, stream_rx, rx, events, keys, replays));
    Ok(h)
}

/// What a stream reader hands the loop: a message read whole and opened, with its share of
/// the memory budget (released when the loop has handled it), or why a stream was refused.
enum Received {
    Message(SocketAddr, Vec<u8>, OwnedSemaphorePermit),
    Refused { from: SocketAddr, why: String },
}

/// How long a stream may take to send a frame's length prefix (it is closed otherwise), and
/// a frame's body.
const STREAM_FIRST_BYTES: Duration = Duration::from_secs(5);
const STREAM_BODY: Duration = Duration::from_secs(10);
/// Bytes of stream messages from peers that proved they hold the key (their first chunk
/// opened), read but not yet handled, across all streams: a message that does not fit is
/// refused (the sender's anti-entropy tries again later).
const STREAM_BUDGET: usize = 64 << 20;
/// Bytes of first chunks read but not yet opened, across all streams: all a peer that has
/// not proven anything can make a node hold (one first chunk per connection, at most
/// [`seal::MAX_FIRST_FRAME`]).
const UNPROVEN_BUDGET: usize = 1 << 20;

/// What stream readers open chunks with: the loop's keys as they change, and the replay
/// guard the loop shares.
#[derive(Clone)]
struct Opener {
    keys: watch::Receiver<Arc<Sealing>>,
    replays: Arc<std::sync::Mutex<ReplayGuard>>,
}

impl Opener {
    /// Opens one frame; a stream's first chunk must also be new to the replay guard.
    fn open(&self, frame: &[u8], first: bool) -> Result<Vec<u8>, String> {
        let keys = self.keys.borrow().clone();
        let now = now_ms();
        let plain = match &*keys {
            Sealing::Keys(k) => k.open(frame, now).map_err(|e| e.to_string())?,
            Sealing::NoKey => return Err("this node has no gossip key yet".into()),
            Sealing::Unsealed => return Ok(frame.to_vec()),
        };
        if first && !self.replays.lock().unwrap_or_else(|p| p.into_inner()).fresh(frame, now) {
            return Err("a message seen before (replayed)".into());
        }
        Ok(plain)
    }
}

/// Accepts streams on 7946 (issues 12 and 19: bounded): at most `limits.total` open at once
/// and `limits.per_peer` from one address (more are closed at once), deadlines for each
/// frame's length prefix and body, frames read as they arrive (never allocated from a
/// prefix), every chunk opened before the next is read. A peer that has not proven it holds
/// the key can make the node hold one first chunk per connection and [`UNPROVEN_BUDGET`] in
/// all. Accept errors (EMFILE, ENFILE, ...) back off and are logged once per burst. Ends,
/// closing the listener, when the loop has stopped.
async fn accept_streams(tcp: TcpListener, tx: mpsc::Sender<Received>, limits: Limits, opener: Opener) {
    let budgets = Budgets { proven: Arc::new(Semaphore::new(STREAM_BUDGET)), unproven: Arc::new(Semaphore::new(UNPROVEN_BUDGET)) };
    let names = Names { what: "gossip", conns: "streams", conn: "stream" };
    let loop_tx = tx.clone();
    let serving = admission::serve(tcp, names, Admission::new(limits), move |s, peer| {
        let peer = peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        read_stream(s, peer, loop_tx.clone(), budgets.clone(), opener.clone())
    });
    tokio::select! {
        _ = serving => {}
        _ = tx.closed() => {}
    }
}

#[derive(Clone)]
struct Budgets {
    proven: Arc<Semaphore>,
    unproven: Arc<Semaphore>,
}

/// Reads one frame of at most `max` bytes, as it arrives; None: the stream ended, stalled
/// or broke the limit (the caller closes it).
async fn read_frame(s: &mut TcpStream, peer: SocketAddr, max: usize, first_of_message: bool) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    // A message's first frame may wait (an idle connection between messages); within a
    // message, every frame is due as its body is.
    let wait = if first_of_message { STREAM_FIRST_BYTES } else { STREAM_BODY };
    match tokio::time::timeout(wait, s.read_exact(&mut len)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return None,
        Err(_) => {
            debug!(%peer, "gossip stream: nothing within the deadline: closing");
            return None;
        }
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > max {
        debug!(%peer, n, max, "gossip stream: frame larger than the limit: closing");
        return None;
    }
    // Grows as bytes arrive: a length prefix alone allocates nothing.
    let mut buf = Vec::with_capacity(n.min(16 << 10));
    let read = tokio::time::timeout(STREAM_BODY, (&mut *s).take(n as u64).read_to_end(&mut buf)).await;
    matches!(read, Ok(Ok(m)) if m == n).then_some(buf)
}

async fn read_stream(mut s: TcpStream, peer: SocketAddr, tx: mpsc::Sender<Received>, budgets: Budgets, opener: Opener) {
    let refuse = |why: String| Received::Refused { from: peer, why };
    loop {
        // A message's first chunk, from a peer that has proven nothing yet.
        let Ok(unproven) = budgets.unproven.clone().try_acquire_many_owned(seal::MAX_FIRST_FRAME as u32) else {
            debug!(%peer, "gossip stream: too many unproven first chunks at once: closing");
            return;
        };
        let Some(frame) = read_frame(&mut s, peer, seal::MAX_FIRST_FRAME, true).await else { return };
        let mut reader = StreamReader::default();
        let plain = match opener.open(&frame, true) {
            Ok(p) => p,
            Err(why) => {
                let _ = tx.send(refuse(why)).await;
                return;
            }
        };
        drop(unproven);
        let (mut permit, mut step) = match reader.take(&plain, MAX_STREAM_MESSAGE) {
            Ok(Step::Started(total)) => match budgets.proven.clone().try_acquire_many_owned(u32::try_from(total.max(1)).unwrap_or(u32::MAX)) {
                Ok(p) => (Some(p), None),
                Err(_) => {
                    debug!(%peer, total, "gossip stream: memory budget spent: closing");
                    return;
                }
            },
            Ok(step) => (None, Some(step)),
            Err(e) => {
                let _ = tx.send(refuse(format!("stream: {e}"))).await;
                return;
            }
        };
        while step.is_none() {
            let Some(frame) = read_frame(&mut s, peer, seal::MAX_FRAME, false).await else { return };
            match opener.open(&frame, false).map_err(|e| e.to_string()).and_then(|p| reader.take(&p, MAX_STREAM_MESSAGE).map_err(|e| format!("stream: {e}"))) {
                Ok(Step::More | Step::Started(_)) => {}
                Ok(done) => step = Some(done),
                Err(why) => {
                    let _ = tx.send(refuse(why)).await;
                    return;
                }
            }
        }
        let Some(Step::Done(message)) = step else { return };
        let permit = match permit.take() {
            Some(p) => p,
            // A one-chunk message: its share of the budget is its size.
            None => match budgets.proven.clone().try_acquire_many_owned(u32::try_from(message.len().max(1)).unwrap_or(u32::MAX)) {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        if tx.send(Received::Message(peer, message, permit)).await.is_err() {
            return;
        }
    }
}

/// Is the host at `addr` up? A TCP connect: accepted, or refused (nothing listens: the
/// agent is gone, the host is not), says yes; a timeout or an unreachable host says no.
async fn probe_host(addr: SocketAddr, within: Duration) -> bool {
    match tokio::time::timeout(within, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

/// Sends one stream message: its chunks, each a frame (a length, then the chunk). The
/// connection leaves from this node's gossip address (`from`, unless unspecified): a node
/// that does not know the sender yet answers only at an address of the host the stream
/// came from (`Gossip::reply_to`).
async fn send_stream(from: Option<std::net::IpAddr>, to: SocketAddr, frames: Vec<Vec<u8>>) {
    let r = tokio::time::timeout(Duration::from_secs(3), async {
        let sock = if to.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        if let Some(ip) = from.filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == to.is_ipv4()) {
            // Many streams to the same peers: a source port whose last connection to this
            // peer is in TIME_WAIT may serve a new one.
            sock.set_reuseaddr(true)?;
            bind_address_no_port(&sock, to);
            sock.bind(SocketAddr::new(ip, 0))?;
        }
        let mut s = sock.connect(to).await?;
        for f in &frames {
            let len = u32::try_from(f.len()).map_err(std::io::Error::other)?;
            s.write_all(&len.to_be_bytes()).await?;
            s.write_all(f).await?;
        }
        s.shutdown().await
    })
    .await;
    if !matches!(r, Ok(Ok(()))) {
        debug!(%to, "gossip stream send failed");
    }
}

/// Leaves the choice of the source port to `connect`, which needs only the 4-tuple to be
/// unique. Otherwise a bind to port 0 searches for a port that no socket of the host holds:
/// with many sockets bound that search was a fifth of 200 gossip instances' idle CPU (issue
/// 23). Where the option is refused the bind still works, the slow way.
fn bind_address_no_port(sock: &tokio::net::TcpSocket, to: SocketAddr) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: the descriptor is `sock`'s, open for the whole call; the option's value is a
    // live c_int, and its size is the length passed, so the kernel reads only that int.
    let r = unsafe { libc::setsockopt(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, std::ptr::from_ref(&one).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) };
    if r != 0 {
        debug!(%to, error = %std::io::Error::last_os_error(), "gossip stream: IP_BIND_ADDRESS_NO_PORT refused");
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Opens a received datagram with the keyring and hands the plaintext to the protocol;
/// anything that does not open is counted and dropped unparsed.
fn receive(g: &mut Gossip, keys: &Sealing, replays: &std::sync::Mutex<ReplayGuard>, from: SocketAddr, data: &[u8], last_warn: &mut Option<Instant>) {
    let now = now_ms();
    let opened = match keys {
        Sealing::Keys(k) => k.open(data, now).map_err(|e| e.to_string()),
        Sealing::NoKey => Err("this node has no gossip key yet".to_string()),
        Sealing::Unsealed => return g.handle(from, data, false, Instant::now()),
    };
    let opened = opened.and_then(|p| if replays.lock().unwrap_or_else(|p| p.into_inner()).fresh(data, now) { Ok(p) } else { Err("a message seen before (replayed)".to_string()) });
    match opened {
        Ok(plain) => g.handle(from, &plain, false, Instant::now()),
        Err(why) => refused(g, from, false, &why, last_warn),
    }
}

/// Counts a message (or stream) that did not authenticate, and logs it at most once a
/// minute, with the sender and why.
fn refused(g: &mut Gossip, from: SocketAddr, stream: bool, why: &str, last_warn: &mut Option<Instant>) {
    g.stats.unauthenticated += 1;
    if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
        *last_warn = Some(Instant::now());
        warn!(node = %g.me().node, %from, stream, why = %why, dropped = g.stats.unauthenticated, "gossip: dropped a message that does not authenticate");
    }
}

/// How the loop seals: not at all before it has keys (it sends nothing), with its keyring,
/// or (benchmarks) in plaintext.
enum Sealing {
    NoKey,
    Keys(Keyring),
    Unsealed,
}

/// Seals one message and sends it (a stream message as sealed chunks); returns the bytes
/// sealing added. Its own messages, sent back to it, are replays too: the guard remembers
/// what it seals.
fn send_sealed(k: Option<&Keyring>, replays: &std::sync::Mutex<ReplayGuard>, udp: &UdpSocket, o: Out) -> usize {
    let now = now_ms();
    let seal = |plain: &[u8]| -> Option<Vec<u8>> {
        match k.map(|k| k.seal(plain, now)) {
            Some(Ok(d)) => {
                replays.lock().unwrap_or_else(|p| p.into_inner()).fresh(&d, now);
                Some(d)
            }
            Some(Err(e)) => {
                warn!(error = %e, "gossip: cannot seal a message");
                None
            }
            None => Some(plain.to_vec()),
        }
    };
    let per = if k.is_some() { OVERHEAD } else { 0 };
    match o {
        Out::Udp { to, data } => {
            let Some(data) = seal(&data) else { return 0 };
            if let Err(e) = udp.try_send_to(&data, to) {
                debug!(%to, error = %e, "gossip udp send");
            }
            per
        }
        Out::Stream { to, data } => {
            let id = match seal::stream_id() {
                Ok(id) => id,
                Err(e) => {
                    warn!(%to, error = %e, "gossip: cannot send a stream");
                    return 0;
                }
            };
            let Some(frames) = seal::chunks(id, &data).iter().map(|c| seal(c)).collect::<Option<Vec<_>>>() else { return 0 };
            let added = frames.len() * per;
            tokio::spawn(send_stream(udp.local_addr().ok().map(|a| a.ip()), to, frames));
            added
        }
        Out::Probe { .. } => 0,
    }
}

async fn run(
    mut g: Gossip,
    udp: UdpSocket,
    mut streams: mpsc::Receiver<Received>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    events: broadcast::Sender<Event>,
    keys_out: watch::Sender<Arc<Sealing>>,
    replays: Arc<std::sync::Mutex<ReplayGuard>>,
) {
    let mut buf = vec![0u8; 65536];
    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<Ident>();
    let mut keys = Arc::new(Sealing::NoKey);
    let mut last_warn: Option<Instant> = None;
    // One timer for the loop's life, moved only when the deadline moves: a new one each turn
    // would be registered with the runtime and removed again for every message.
    let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(g.next_deadline()));
    tokio::pin!(sleep);
    loop {
        let deadline = tokio::time::Instant::from_std(g.next_deadline());
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        tokio::select! {
            r = udp.recv_from(&mut buf) => match r {
                Ok((n, from)) => receive(&mut g, &keys, &replays, from, &buf[..n], &mut last_warn),
                Err(e) => warn!(error = %e, "gossip udp receive"),
            },
            Some(r) = streams.recv() => match r {
                // Opened chunk by chunk by its reader.
                Received::Message(from, data, _budget) => g.handle(from, &data, true, Instant::now()),
                Received::Refused { from, why } => refused(&mut g, from, true, &why, &mut last_warn),
            },
            Some(alive) = probe_rx.recv() => g.host_alive(&alive, Instant::now()),
            c = cmds.recv() => {
                let Some(c) = c else { return };
                let now = Instant::now();
                match c {
                    Cmd::Seeds(s) => g.join_via(&s, now),
                    Cmd::Nodes(s) => g.set_nodes(&s, now),
                    Cmd::Leave(n) => g.leave_network(&n, now),
                    Cmd::Set(e) => g.set_endpoint(*e, now),
                    Cmd::Remove { network, id } => g.remove_endpoint(&network, &id, now),
                    Cmd::Join(n) => g.join_network(&n, now),
                    Cmd::Stats { reply } => {
                        let _ = reply.send(g.stats_now());
                    }
                    Cmd::Stop => return,
                    Cmd::Keys(k) => {
                        info!(keys = ?k.ids(), send = k.send_id(), "gossip: keys set");
                        keys = Arc::new(Sealing::Keys(*k));
                        keys_out.send_replace(keys.clone());
                    }
                    Cmd::Unsealed => {
                        warn!("gossip: unsealed (a benchmark's setting: anyone can read and write this node's gossip)");
                        keys = Arc::new(Sealing::Unsealed);
                        keys_out.send_replace(keys.clone());
                    }
                    Cmd::Members { reply } => {
                        let _ = reply.send(g.members().cloned().collect());
                    }
                    Cmd::Networks { reply } => {
                        let _ = reply.send(g.table().joined().iter().cloned().collect());
                    }
                    Cmd::Endpoints { network, reply } => {
                        let _ = reply.send(g.table().endpoints(&network));
                    }
                }
            }
            () = &mut sleep => g.tick(Instant::now()),
        }
        let mut out = g.take_out();
        out.retain(|o| match o {
            Out::Probe { node } => {
                let (node, tx, within) = (node.clone(), probe_tx.clone(), g.probe_timeout());
                tokio::spawn(async move {
                    if probe_host(node.addr, within).await {
                        let _ = tx.send(node);
                    }
                });
                false
            }
            _ => true,
        });
        match &*keys {
            Sealing::Keys(k) => {
                for o in out {
                    g.stats.sealing_bytes += send_sealed(Some(k), &replays, &udp, o) as u64;
                }
            }
            Sealing::Unsealed => {
                for o in out {
                    send_sealed(None, &replays, &udp, o);
                }
            }
            // Without a key nothing leaves: a node the manager has not admitted says nothing.
            Sealing::NoKey if !out.is_empty() => debug!(messages = out.len(), "gossip: no key yet, not sending"),
            Sealing::NoKey => {}
        }
        for e in g.take_events() {
            match &e {
                Event::NodeUp(id) => info!(node = %id.node, addr = %id.addr, gen = id.gen, "gossip: node up"),
                Event::NodeDown(id) => info!(node = %id.node, addr = %id.addr, gen = id.gen, "gossip: node down (its entries stay while its host answers)"),
                Event::Renewed(id) => warn!(gen = id.gen, "gossip: this node lost every member; rejoining under a new generation"),
                Event::Endpoint(c) => debug!(network = %c.network, endpoint = %c.id, present = c.new.is_some(), "gossip: endpoint"),
            }
            let _ = events.send(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stopped_loop_answers_errors_and_closes_the_stream_never_an_empty_table() {
        let me = Ident::new("n1", "127.0.0.1:0".parse().expect("addr"), 1);
        let h = start(me, Config::default()).await.expect("start");
        let mut events = h.subscribe();
        h.send(Cmd::Join("net".into())).expect("send");
        assert_eq!(h.endpoints("net").await, Ok(vec![]), "a live loop answers");
        assert_eq!(h.networks().await, Ok(vec!["net".to_string()]));
        h.send(Cmd::Stop).expect("send");
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match events.recv().await {
                    Err(broadcast::error::RecvError::Closed) => return true,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                }
            }
        })
        .await
        .expect("the stream closes when the loop ends");
        assert!(closed);
        assert_eq!(h.endpoints("net").await, Err(Stopped));
        assert_eq!(h.members().await, Err(Stopped));
        assert!(h.send(Cmd::Leave("net".into())).is_err());
        assert!(h.subscribe().try_recv().is_err());
    }
}
