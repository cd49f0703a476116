//! Bounded listeners (issue 12): how many connections a listener holds at once, in total
//! and from one address, and how it reports a burst of accept failures: pure counting, no
//! I/O. Behind the feature `accept`, the one accept-and-admit loop that every listener
//! (2377, 7946 TCP, the control socket, DNS over TCP) runs on these rules ([`serve`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A listener's caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub total: usize,
    pub per_peer: usize,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// Admits connections within [`Limits`]; each admitted one holds a [`Slot`] that frees its
/// place when dropped.
#[derive(Clone)]
pub struct Admission {
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
    /// Peers the per-peer cap does not apply to (they count in the total): on 2377, the
    /// other managers, which relay many agents' connections from one address.
    exempt: Option<Arc<dyn Fn(IpAddr) -> bool + Send + Sync>>,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Total(usize),
    PerPeer(usize),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Total(n) => write!(f, "{n} connections open (the limit)"),
            Refused::PerPeer(n) => write!(f, "{n} connections open from this address (the limit)"),
        }
    }
}

pub struct Slot {
    peer: Option<IpAddr>,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(ip) = self.peer {
            if let Some(n) = c.per_peer.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_peer.remove(&ip);
                }
            }
        }
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission { limits, counts: Arc::default(), exempt: None }
    }

    /// The same, with the peers `exempt` says true of counted in the total only.
    pub fn exempting(self, exempt: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>) -> Admission {
        Admission { exempt: Some(exempt), ..self }
    }

    /// A slot for a connection from `peer` (None: a local socket, counted in the total
    /// only), or why not.
    pub fn admit(&self, peer: Option<IpAddr>) -> Result<Slot, Refused> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.limits.total {
            return Err(Refused::Total(self.limits.total));
        }
        let peer = peer.filter(|ip| !self.exempt.as_ref().is_some_and(|f| f(*ip)));
        if let Some(ip) = peer {
            let n = c.per_peer.entry(ip).or_insert(0);
            if *n >= self.limits.per_peer {
                return Err(Refused::PerPeer(self.limits.per_peer));
            }
            *n += 1;
        }
        c.total += 1;
        Ok(Slot { peer, counts: self.counts.clone() })
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// Accept failures (EMFILE, ENFILE, ...) come in bursts: the listener waits
/// [`AcceptErrors::BACKOFF`] after each, and says so once per burst and once when it
/// accepts again.
#[derive(Default)]
pub struct AcceptErrors {
    burst: Option<(Instant, u64)>,
}

/// What to log after an accept.
#[derive(Debug, PartialEq, Eq)]
pub enum AcceptNote {
    Nothing,
    /// The first failure of a burst.
    Failing,
    /// Accepting again after `failed` failures over `lasted`.
    Recovered {
        failed: u64,
        lasted: Duration,
    },
}

impl AcceptErrors {
    pub const BACKOFF: Duration = Duration::from_millis(100);

    pub fn failed(&mut self, now: Instant) -> AcceptNote {
        match &mut self.burst {
            Some((_, n)) => {
                *n += 1;
                AcceptNote::Nothing
            }
            None => {
                self.burst = Some((now, 1));
                AcceptNote::Failing
            }
        }
    }

    pub fn accepted(&mut self, now: Instant) -> AcceptNote {
        match self.burst.take() {
            Some((since, failed)) => AcceptNote::Recovered { failed, lasted: now.saturating_duration_since(since) },
            None => AcceptNote::Nothing,
        }
    }
}

/// Counts refusals and says when one is worth a log line (the 1st, 2nd, 4th, 8th, ...).
#[derive(Default)]
pub struct RefusalLog(u64);

impl RefusalLog {
    pub fn note(&mut self) -> Option<u64> {
        self.0 += 1;
        self.0.is_power_of_two().then_some(self.0)
    }
}

/// What a listener's log lines call it and its connections:
/// "`what`: cannot accept `conns` (backing off ...)", "`what`: `conn` refused".
#[derive(Clone, Copy, Debug)]
pub struct Names {
    pub what: &'static str,
    pub conns: &'static str,
    pub conn: &'static str,
}

#[cfg(feature = "accept")]
pub use accept::{serve, Listen};

/// The one accept-and-admit loop of every listener (issue 19): 7946 TCP, 2377, the control
/// socket and DNS over TCP.
#[cfg(feature = "accept")]
mod accept {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::task::{Context, Poll};

    use tracing::{info, warn};

    use super::{AcceptErrors, AcceptNote, Admission, Names, RefusalLog, Slot};

    /// A listener the loop accepts from: TCP (its peers counted per address) or a Unix socket
    /// (local: counted in the total only).
    pub trait Listen: Send + Sync + 'static {
        type Conn: Send + 'static;
        fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<(Self::Conn, Option<SocketAddr>)>>;
    }

    impl Listen for tokio::net::TcpListener {
        type Conn = tokio::net::TcpStream;
        fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<(Self::Conn, Option<SocketAddr>)>> {
            tokio::net::TcpListener::poll_accept(self, cx).map_ok(|(s, peer)| (s, Some(peer)))
        }
    }

    impl Listen for tokio::net::UnixListener {
        type Conn = tokio::net::UnixStream;
        fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<(Self::Conn, Option<SocketAddr>)>> {
            tokio::net::UnixListener::poll_accept(self, cx).map_ok(|(s, _)| (s, None))
        }
    }

    /// Accepts connections for as long as it is polled; each admitted one (within
    /// `admission`'s caps, in total and per address) is handed to `handle` and runs as a task
    /// of this loop, holding its place until it ends: dropping the loop ends them all.
    /// A connection over a cap is closed at once (the refusals logged the 1st, 2nd, 4th, 8th
    /// … time). Accept errors (EMFILE, ENFILE, …) back off [`AcceptErrors::BACKOFF`] and are
    /// logged once per burst, and once when accepting works again.
    pub async fn serve<L, H, F>(listener: L, names: Names, admission: Admission, mut handle: H)
    where
        L: Listen,
        H: FnMut(L::Conn, Option<SocketAddr>) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let mut errors = AcceptErrors::default();
        let mut refusals = RefusalLog::default();
        let mut conns = tokio::task::JoinSet::new();
        loop {
            while conns.try_join_next().is_some() {}
            match std::future::poll_fn(|cx| listener.poll_accept(cx)).await {
                Ok((conn, peer)) => {
                    if let AcceptNote::Recovered { failed, lasted } = errors.accepted(std::time::Instant::now()) {
                        info!(failed, lasted_ms = lasted.as_millis() as u64, "{}: accepting {} again", names.what, names.conns);
                    }
                    match admission.admit(peer.map(|p| p.ip())) {
                        Ok(slot) => {
                            let served = handle(conn, peer);
                            conns.spawn(async move {
                                let _slot: Slot = slot;
                                served.await
                            });
                        }
                        Err(why) => {
                            if let Some(n) = refusals.note() {
                                warn!(peer = ?peer, refused = n, why = %why, "{}: {} refused", names.what, names.conn);
                            }
                        }
                    }
                }
                Err(e) => {
                    if errors.failed(std::time::Instant::now()) == AcceptNote::Failing {
                        warn!(error = %e, "{}: cannot accept {} (backing off; logged once per burst)", names.what, names.conns);
                    }
                    tokio::time::sleep(AcceptErrors::BACKOFF).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_total_and_per_peer_and_slots_free_their_place() {
        let a = Admission::new(Limits { total: 3, per_peer: 2 });
        let p1: IpAddr = "10.0.0.1".parse().expect("ip");
        let p2: IpAddr = "10.0.0.2".parse().expect("ip");
        let s1 = a.admit(Some(p1)).expect("1");
        let _s2 = a.admit(Some(p1)).expect("2");
        assert_eq!(a.admit(Some(p1)).err(), Some(Refused::PerPeer(2)));
        let _s3 = a.admit(Some(p2)).expect("3");
        assert_eq!(a.admit(Some(p2)).err(), Some(Refused::Total(3)));
        assert_eq!(a.open(), 3);
        drop(s1);
        assert_eq!(a.open(), 2);
        let _s4 = a.admit(Some(p1)).expect("p1 has room again");
        assert!(a.admit(None).is_err(), "local sockets count in the total");
    }

    #[test]
    fn an_exempt_peer_has_no_per_peer_cap_but_counts_in_the_total() {
        let relay: IpAddr = "10.0.0.9".parse().expect("ip");
        let a = Admission::new(Limits { total: 4, per_peer: 1 }).exempting(Arc::new(move |ip| ip == relay));
        let held: Vec<Slot> = (0..3).map(|i| a.admit(Some(relay)).unwrap_or_else(|e| panic!("relayed {i}: {e}"))).collect();
        let other: IpAddr = "10.0.0.1".parse().expect("ip");
        let _o = a.admit(Some(other)).expect("another peer");
        assert_eq!(a.admit(Some(relay)).err(), Some(Refused::Total(4)));
        drop(held);
        assert_eq!(a.admit(Some(other)).err(), Some(Refused::PerPeer(1)), "the others keep their cap");
    }

    #[tokio::test]
    async fn the_loop_admits_within_the_caps_and_its_connections_end_with_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let names = Names { what: "test", conns: "connections", conn: "connection" };
        // Each admitted connection answers one byte and stays open.
        let serving = tokio::spawn(serve(listener, names, Admission::new(Limits { total: 10, per_peer: 2 }), |mut c: tokio::net::TcpStream, _peer| async move {
            let _ = c.write_all(b"y").await;
            let mut b = [0u8; 1];
            let _ = c.read(&mut b).await;
        }));
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.expect("admitted");
            open.push(c);
        }
        // A third from the same address is over its cap: closed unanswered.
        let mut third = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut b = [0u8; 1];
        assert_eq!(third.read(&mut b).await.expect("read"), 0, "closed at once");
        // The loop stops: its connections end with it.
        serving.abort();
        let _ = serving.await;
        for mut c in open {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), c.read(&mut b)).await.expect("closed within 5 s");
            assert!(matches!(n, Ok(0) | Err(_)), "a connection of the stopped loop is closed");
        }
    }

    #[test]
    fn accept_errors_are_noted_once_per_burst() {
        let mut e = AcceptErrors::default();
        let t = Instant::now();
        assert_eq!(e.accepted(t), AcceptNote::Nothing);
        assert_eq!(e.failed(t), AcceptNote::Failing);
        assert_eq!(e.failed(t), AcceptNote::Nothing);
        assert_eq!(e.accepted(t + Duration::from_secs(1)), AcceptNote::Recovered { failed: 2, lasted: Duration::from_secs(1) });
        let mut r = RefusalLog::default();
        let logged: Vec<u64> = (0..10).filter_map(|_| r.note()).collect();
        assert_eq!(logged, vec![1, 2, 4, 8]);
    }
}
