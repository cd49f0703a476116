//! The embedded resolver: a hickory-server request handler over the record store, one per
//! task (it carries the task's networks: a task sees only names on them), served on a UDP
//! socket and a TCP listener that were opened inside the task's network namespace. Both
//! have loops of their own: UDP batched (ADR 0007), TCP bounded (issue 12: connections in
//! total and per address, a deadline for every frame, accept errors backed off).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::net::NetError;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, PTR, SRV};
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use swarmnet_types::admission::{self, Admission, Limits, Names};
use swarmnet_types::metrics::{Histogram, LabeledCounters};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use crate::forward::Forwarder;
use crate::records::{self, Answer, Records};
use crate::sink::{self, RecordStore};

/// How long an idle TCP connection to the resolver stays open, and how long a frame's
/// length prefix, its body and an answer's write may take.
const TCP_IDLE: Duration = Duration::from_secs(5);
/// TCP connections to one task's resolver: in all, and from one address (only the task
/// itself can reach 127.0.0.11). Frames are at most 64 KiB by the protocol.
const TCP_LIMITS: Limits = Limits { total: 64, per_peer: 32 };
/// The largest UDP answer we send, whatever the client's EDNS size says.
const MAX_UDP: u16 = 4096;

pub struct Config {
    /// TTL of the cluster's own records, in seconds.
    pub ttl: u32,
    pub forwarder: Forwarder,
}

/// Counters since the daemon started, shown as `local_dns` by `network inspect` and as
/// metrics (`--metrics-addr`).
pub struct Counters {
    pub local: AtomicU64,
    pub forwarded: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub refused: AtomicU64,
    /// Queries by type ([`QTYPES`]).
    pub qtypes: LabeledCounters,
    /// Replies by code ([`RCODES`]).
    pub rcodes: LabeledCounters,
    /// How long forwarded queries took upstream (answered or not).
    pub upstream_latency: Histogram,
}

/// The query types counted apart; the rest count as `other`.
pub const QTYPES: &[&str] = &["A", "AAAA", "PTR", "SRV", "TXT", "MX", "CNAME", "ANY", "other"];
/// The reply codes counted apart; the rest count as `other`.
pub const RCODES: &[&str] = &["NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR", "NOTIMP", "other"];

impl Default for Counters {
    fn default() -> Self {
        Counters {
            local: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            upstream_failures: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            qtypes: LabeledCounters::new(QTYPES),
            rcodes: LabeledCounters::new(RCODES),
            upstream_latency: Histogram::default(),
        }
    }
}

fn qtype_index(t: Option<RecordType>) -> usize {
    match t {
        Some(RecordType::A) => 0,
        Some(RecordType::AAAA) => 1,
        Some(RecordType::PTR) => 2,
        Some(RecordType::SRV) => 3,
        Some(RecordType::TXT) => 4,
        Some(RecordType::MX) => 5,
        Some(RecordType::CNAME) => 6,
        Some(RecordType::ANY) => 7,
        _ => usize::MAX,
    }
}

fn rcode_index(c: ResponseCode) -> usize {
    match c {
        ResponseCode::NoError => 0,
        ResponseCode::NXDomain => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::Refused => 3,
        ResponseCode::FormErr => 4,
        ResponseCode::NotImp => 5,
        _ => usize::MAX,
    }
}

/// What every task's resolver on this node shares.
pub struct Shared {
    pub records: RecordStore,
    pub config: Config,
    pub counters: Counters,
    shuffle: AtomicU64,
    /// The runtime of the thread that serves every task's UDP socket.
    udp_rt: tokio::runtime::Handle,
}

impl Shared {
    /// Also starts the `sn-dns` thread: a single-threaded runtime for the UDP loops. Waking
    /// a task there costs one epoll wake on one thread, where the daemon's multi-threaded
    /// runtime adds cross-thread hand-offs per query (ADR 0007).
    pub fn new(config: Config) -> std::io::Result<Arc<Shared>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let udp_rt = rt.handle().clone();
        std::thread::Builder::new().name("sn-dns".into()).spawn(move || rt.block_on(std::future::pending::<()>()))?;
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        Ok(Arc::new(Shared { records: RecordStore::default(), config, counters: Counters::default(), shuffle: AtomicU64::new(seed), udp_rt }))
    }

    /// Runs `f` on the records.
    pub fn read<R>(&self, f: impl FnOnce(&Records) -> R) -> R {
        sink::read(&self.records, f)
    }

    pub fn write<R>(&self, f: impl FnOnce(&mut Records) -> R) -> R {
        sink::write(&self.records, f)
    }

    /// A new order for `v` (per query, so clients that take the first address spread out).
    fn shuffle<T>(&self, v: &mut [T]) {
        let mut x = self.shuffle.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        for i in (1..v.len()).rev() {
            x = splitmix(x);
            let j = (x % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The resolver of one task.
#[derive(Clone)]
pub struct TaskResolver {
    shared: Arc<Shared>,
    /// Network ids the task is attached to.
    scope: Arc<[String]>,
}

/// A task's resolver at work; dropping it closes its sockets (and TCP connections).
pub struct Listener {
    tcp: tokio::task::JoinHandle<()>,
    udp: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.tcp.abort();
        self.udp.abort();
    }
}

/// Serves a task's resolver on sockets opened in its namespace. Must be called inside the
/// tokio runtime that will serve them.
///
/// UDP has a loop of its own (see ADR 0007): it answers the cluster's names inline, without
/// a task and two channel hops per query, and spawns only for queries that are forwarded
/// upstream. TCP too ([`serve_tcp`]): bounded, one query at a time per connection.
pub fn serve(shared: Arc<Shared>, scope: Vec<String>, udp: std::net::UdpSocket, tcp: std::net::TcpListener) -> std::io::Result<Listener> {
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    let rt = shared.udp_rt.clone();
    let resolver = TaskResolver { shared, scope: scope.into() };
    let tcp = tokio::spawn(serve_tcp(tokio::net::TcpListener::from_std(tcp)?, resolver.clone(), TCP_LIMITS));
    let udp = {
        let _in_dns_thread = rt.enter();
        Arc::new(tokio::net::UdpSocket::from_std(udp)?)
    };
    Ok(Listener { tcp, udp: rt.spawn(serve_udp(udp, resolver)) })
}

/// Accepts TCP connections on the shared loop (`admission::serve`, issues 12 and 19): at
/// most `limits.total` open and `limits.per_peer` from one address, accept errors backed
/// off; its connections end with it.
async fn serve_tcp(listener: tokio::net::TcpListener, resolver: TaskResolver, limits: Limits) {
    let names = Names { what: "resolver", conns: "TCP connections", conn: "TCP connection" };
    admission::serve(listener, names, Admission::new(limits), |s, peer| tcp_connection(s, peer.unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0))), resolver.clone())).await
}

/// One TCP connection: length-prefixed queries, each within [`TCP_IDLE`] (prefix, then
/// body), answered in turn.
async fn tcp_connection(mut s: tokio::net::TcpStream, peer: std::net::SocketAddr, resolver: TaskResolver) {
    loop {
        let mut len = [0u8; 2];
        if !matches!(tokio::time::timeout(TCP_IDLE, s.read_exact(&mut len)).await, Ok(Ok(_))) {
            return;
        }
        // At most 64 KiB: the prefix is 16 bits.
        let mut raw = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if !matches!(tokio::time::timeout(TCP_IDLE, s.read_exact(&mut raw)).await, Ok(Ok(_))) {
            debug!(%peer, "resolver: TCP query not complete within the deadline: closing");
            return;
        }
        let Some(answer) = stream_message(&resolver, raw, peer).await else { continue };
        let Ok(n) = u16::try_from(answer.len()) else { continue };
        let mut out = Vec::with_capacity(2 + answer.len());
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&answer);
        if !matches!(tokio::time::timeout(TCP_IDLE, s.write_all(&out)).await, Ok(Ok(_))) {
            return;
        }
    }
}

/// One query over TCP: its whole answer (up to 65,535 bytes, never truncated), FORMERR for a
/// readable header with an unreadable body, None for anything else (dropped).
async fn stream_message(resolver: &TaskResolver, raw: Vec<u8>, from: std::net::SocketAddr) -> Option<Vec<u8>> {
    let request = match Request::from_bytes(raw.clone(), from, hickory_server::net::xfer::Protocol::Tcp) {
        Ok(r) => r,
        Err(_) => {
            resolver.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            return formerr(&raw);
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let slot = Arc::new(std::sync::Mutex::new(None));
    let plan = resolver.plan(&request);
    resolver.respond(&request, plan, Responder { sink: Sink::Stream(slot.clone()), dst: from }).await;
    let answer = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    answer
}

async fn serve_udp(sock: Arc<tokio::net::UdpSocket>, resolver: TaskResolver) {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let fd = sock.as_raw_fd();
    let mut batch = crate::udp::Batch::default();
    let outbox = Outbox::default();
    loop {
        if let Err(e) = sock.readable().await {
            debug!(error = %e, "resolver: udp socket");
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let got = match sock.try_io(Interest::READABLE, || batch.recv(fd)) {
            Ok(g) => g,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                debug!(error = %e, "resolver: udp receive");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        for g in &got {
            if let Some(request) = datagram(&resolver, batch.data(g), g.from, &outbox).await {
                let r = resolver.clone();
                let responder = Responder { sink: Sink::Socket(sock.clone()), dst: g.from };
                tokio::spawn(async move { r.respond(&request, Plan::Forward, responder).await });
            }
        }
        let out = outbox.take();
        let mut sent = 0;
        while sent < out.len() {
            match sock.try_io(Interest::WRITABLE, || batch.send(fd, &out[sent..])) {
                Ok(n) => sent += n.max(1),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let _ = sock.writable().await;
                }
                Err(e) => {
                    debug!(error = %e, to = %out[sent].1, "resolver: udp send");
                    sent += 1;
                }
            }
        }
    }
}

/// One UDP datagram from `from`: answered into `outbox` from the records (or FORMERR, or
/// dropped), or returned when it must be forwarded upstream.
async fn datagram(resolver: &TaskResolver, raw: &[u8], from: std::net::SocketAddr, outbox: &Outbox) -> Option<Request> {
    if from.port() == 0 {
        return None;
    }
    let request = match Request::from_bytes(raw.to_vec(), from, hickory_server::net::xfer::Protocol::Udp) {
        Ok(r) => r,
        Err(_) => {
            resolver.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(reply) = formerr(raw) {
                outbox.push(reply, from);
            }
            return None;
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let plan = resolver.plan(&request);
    if plan == Plan::Forward {
        return Some(request);
    }
    // Completes at once: the outbox only stores the encoded answer.
    resolver.respond(&request, plan, outbox.to(from)).await;
    None
}

/// The UDP path without a socket, for the fuzz targets (`fuzz/`): the datagram as a task on
/// `scope`'s networks would send it, and the answers the resolver would send back (none for
/// a query it forwards upstream or drops).
pub async fn answer_datagram(shared: Arc<Shared>, scope: Vec<String>, raw: &[u8], from: std::net::SocketAddr) -> Vec<Vec<u8>> {
    let resolver = TaskResolver { shared, scope: scope.into() };
    let outbox = Outbox::default();
    let _forwarded = datagram(&resolver, raw, from, &outbox).await;
    outbox.take().into_iter().map(|(b, _)| b).collect()
}

/// An encoded answer and where it goes.
type Outgoing = (Vec<u8>, std::net::SocketAddr);

/// Answers waiting to go out in the next `sendmmsg`.
#[derive(Clone, Default)]
struct Outbox(Arc<std::sync::Mutex<Vec<Outgoing>>>);

impl Outbox {
    fn push(&self, bytes: Vec<u8>, to: std::net::SocketAddr) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push((bytes, to));
    }

    fn take(&self) -> Vec<Outgoing> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn to(&self, dst: std::net::SocketAddr) -> Responder {
        Responder { sink: Sink::Outbox(self.clone()), dst }
    }
}

/// FORMERR for a query whose header is readable but whose body is not; None for anything
/// that is not even a query header (dropped).
fn formerr(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() < 12 || raw[2] & 0x80 != 0 {
        return None;
    }
    let mut h = vec![0u8; 12];
    h[..2].copy_from_slice(&raw[..2]);
    // QR, the query's opcode and RD; RA; RCODE 1.
    h[2] = 0x80 | (raw[2] & 0x79);
    h[3] = 0x80 | 0x01;
    Some(h)
}

/// Encodes an answer for UDP: cut to 512 bytes or the client's EDNS size (records that do
/// not fit are left out and TC is set); SERVFAIL if it cannot be encoded at all.
fn encode_udp<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let max = response.edns().map_or(512, |e| e.max_payload().max(512));
    encode(response, max)
}

/// Encodes an answer within `max` bytes (records that do not fit are left out and TC is
/// set); SERVFAIL if it cannot be encoded at all.
fn encode<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    max: u16,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let id = response.metadata().id;
    let mut bytes = Vec::with_capacity(512);
    let mut enc = BinEncoder::new(&mut bytes);
    enc.set_max_size(max);
    let info = match response.destructive_emit(&mut enc) {
        Ok(info) => info,
        Err(e) => {
            debug!(error = %e, "resolver: encoding an answer failed: SERVFAIL");
            bytes.clear();
            let mut enc = BinEncoder::new(&mut bytes);
            let mut m = Metadata::new(id, MessageType::Response, OpCode::Query);
            m.response_code = ResponseCode::ServFail;
            let h = Header { metadata: m, counts: HeaderCounts::default() };
            h.emit(&mut enc).map_err(|e| NetError::from(e.to_string()))?;
            ResponseInfo::from(h)
        }
    };
    Ok((info, bytes))
}

/// Where an answer goes: into the UDP loop's next `sendmmsg` batch, (for a forwarded
/// query, answered later from its own task) straight onto the UDP socket, or to a TCP
/// connection, which writes it.
#[derive(Clone)]
enum Sink {
    Outbox(Outbox),
    Socket(Arc<tokio::net::UdpSocket>),
    Stream(Arc<std::sync::Mutex<Option<Vec<u8>>>>),
}

/// Answers a query: over UDP cut to 512 bytes or the client's EDNS size (records that do not
/// fit are left out and TC is set), over TCP whole (up to 64 KiB).
#[derive(Clone)]
struct Responder {
    sink: Sink,
    dst: std::net::SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for Responder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        if let Sink::Stream(slot) = &self.sink {
            let (info, bytes) = encode(response, u16::MAX)?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes);
            return Ok(info);
        }
        let (info, bytes) = encode_udp(response)?;
        match &self.sink {
            Sink::Outbox(o) => o.push(bytes, self.dst),
            Sink::Socket(s) => {
                s.send_to(&bytes, self.dst).await?;
            }
            Sink::Stream(_) => {}
        }
        Ok(info)
    }
}

/// What to answer, decided without I/O.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Records(Vec<Record>),
    NoData,
    Code(ResponseCode),
    Forward,
}

impl TaskResolver {
    fn plan(&self, request: &Request) -> Plan {
        if request.metadata.op_code != OpCode::Query {
            return Plan::Code(ResponseCode::NotImp);
        }
        let queries = request.queries.queries();
        let [q] = queries else {
            return Plan::Code(ResponseCode::FormErr);
        };
        let qtype = q.query_type();
        match q.query_class() {
            DNSClass::IN => {}
            DNSClass::CH | DNSClass::HS | DNSClass::ANY | DNSClass::NONE | DNSClass::Unknown(_) | DNSClass::OPT(_) => {
                return Plan::Code(ResponseCode::NotImp);
            }
        }
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR | RecordType::OPT) {
            return Plan::Code(ResponseCode::NotImp);
        }
        let name: Name = q.name().clone().into();
        let text = name.to_ascii();
        let scope = &self.scope[..];
        let ttl = self.shared.config.ttl;
        let answer = self.shared.read(|r| match qtype {
            RecordType::A => r.a(scope, &text),
            RecordType::SRV => r.srv(scope, &text),
            RecordType::PTR => match name.parse_arpa_name() {
                Ok(net) => match net.addr() {
                    IpAddr::V4(ip) if net.prefix_len() == 32 => match r.ptr(scope, ip) {
                        Answer::NotLocal if records::locally_served(IpAddr::V4(ip)) => Answer::NxDomain,
                        a => a,
                    },
                    IpAddr::V6(ip) if net.prefix_len() == 128 && records::locally_served(IpAddr::V6(ip)) => Answer::NxDomain,
                    _ => Answer::NotLocal,
                },
                Err(_) => r.other(scope, &text),
            },
            _ => r.other(scope, &text),
        });
        match answer {
            Answer::Addrs(mut ips) => {
                self.shared.shuffle(&mut ips);
                Plan::Records(ips.into_iter().map(|ip: Ipv4Addr| Record::from_rdata(name.clone(), ttl, RData::A(A(ip)))).collect())
            }
            Answer::Name(target) => match Name::from_ascii(format!("{target}.")) {
                Ok(t) => Plan::Records(vec![Record::from_rdata(name, ttl, RData::PTR(PTR(t)))]),
                Err(_) => Plan::Code(ResponseCode::ServFail),
            },
            Answer::Srv(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (port, target) in list {
                    let Ok(t) = Name::from_ascii(format!("{target}.")) else { return Plan::Code(ResponseCode::ServFail) };
                    out.push(Record::from_rdata(name.clone(), ttl, RData::SRV(SRV::new(0, 1, port, t))));
                }
                self.shared.shuffle(&mut out);
                Plan::Records(out)
            }
            Answer::NoData => Plan::NoData,
            Answer::NxDomain => Plan::Code(ResponseCode::NXDomain),
            Answer::NotLocal => Plan::Forward,
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for TaskResolver {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response: R) -> ResponseInfo {
        self.respond(request, self.plan(request), response).await
    }
}

impl TaskResolver {
    async fn respond<R: ResponseHandler>(&self, request: &Request, plan: Plan, mut response: R) -> ResponseInfo {
        let resp_edns = request.edns.as_ref().map(|e| {
            let mut r = Edns::new();
            r.set_max_payload(e.max_payload().clamp(512, MAX_UDP));
            r.set_version(0);
            r
        });
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = true;
        let builder = MessageResponseBuilder::new(&request.queries, resp_edns.as_ref());
        let c = &self.shared.counters;
        c.qtypes.inc(qtype_index(request.queries.queries().first().map(|q| q.query_type())));
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            meta.response_code = ResponseCode::BADVERS;
            c.rcodes.inc(usize::MAX);
            return send(&mut response, builder.build_no_records(meta), &request.metadata).await;
        }
        match &plan {
            Plan::Records(_) | Plan::NoData => c.rcodes.inc(0),
            Plan::Code(code) => c.rcodes.inc(rcode_index(*code)),
            Plan::Forward => {}
        }
        match plan {
            Plan::Records(recs) => {
                c.local.fetch_add(1, Ordering::Relaxed);
                meta.authoritative = true;
                send(&mut response, builder.build(meta, recs.iter(), None, None, None), &request.metadata).await
            }
            Plan::NoData => {
                c.local.fetch_add(1, Ordering::Relaxed);
                meta.authoritative = true;
                send(&mut response, builder.build_no_records(meta), &request.metadata).await
            }
            Plan::Code(code) => {
                if code == ResponseCode::NXDomain {
                    c.local.fetch_add(1, Ordering::Relaxed);
                    meta.authoritative = true;
                } else {
                    c.refused.fetch_add(1, Ordering::Relaxed);
                }
                meta.response_code = code;
                send(&mut response, builder.build_no_records(meta), &request.metadata).await
            }
            Plan::Forward => {
                c.forwarded.fetch_add(1, Ordering::Relaxed);
                let tcp = request.protocol() != hickory_server::net::xfer::Protocol::Udp;
                let asked = std::time::Instant::now();
                let upstream = match self.shared.config.forwarder.forward(request.as_slice(), tcp).await {
                    Ok(bytes) => Message::from_vec(&bytes).map_err(|e| format!("upstream answer does not parse: {e}")),
                    Err(e) => Err(e.to_string()),
                };
                c.upstream_latency.observe(asked.elapsed());
                c.rcodes.inc(upstream.as_ref().map(|m| rcode_index(m.metadata.response_code)).unwrap_or(2));
                match upstream {
                    Ok(m) => {
                        // The upstream's answer, rcode and flags, under the client's id.
                        let mut um = m.metadata;
                        um.id = request.metadata.id;
                        send(&mut response, builder.build(um, m.answers.iter(), m.authorities.iter(), None, m.additionals.iter()), &request.metadata).await
                    }
                    Err(e) => {
                        c.upstream_failures.fetch_add(1, Ordering::Relaxed);
                        let name = request.queries.queries().first().map(|q| q.name().to_string()).unwrap_or_default();
                        debug!(%name, error = %e, "forwarding failed: SERVFAIL");
                        meta.response_code = ResponseCode::ServFail;
                        send(&mut response, builder.build_no_records(meta), &request.metadata).await
                    }
                }
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    msg: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Metadata,
) -> ResponseInfo {
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(e) => {
            debug!(error = %e, "could not send a DNS answer");
            let mut m = Metadata::response_from_request(request);
            m.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header { metadata: m, counts: HeaderCounts::default() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_server::proto::op::{Message, Query};
    use std::net::SocketAddr;
    use swarmnet_types::{Change, Endpoint, EndpointState};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ep(id: u32, svc: &str, vip: Option<Ipv4Addr>) -> Endpoint {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 1, 0)) + id);
        Endpoint {
            network: "n".into(),
            id: format!("t{id}"),
            task_name: format!("{svc}.{id}"),
            service_name: svc.into(),
            service_id: format!("{svc}-id"),
            aliases: vec![],
            ip,
            mac: [2, 0x42, 10, 0, 1, id as u8],
            vtep: "10.210.0.1".parse().expect("ip"),
            vip,
            ports: vec![],
            state: EndpointState::Active,
        }
    }

    async fn start(upstreams: Vec<SocketAddr>) -> (Arc<Shared>, Listener, SocketAddr) {
        let shared = Shared::new(Config { ttl: 2, forwarder: Forwarder { upstreams, timeout: Duration::from_millis(300) } }).expect("dns thread");
        shared.write(|r| {
            for i in 1..=40 {
                let e = ep(i, "big", None);
                r.apply(&Change { network: "n".into(), id: e.id.clone(), old: None, new: Some(std::sync::Arc::new(e)) });
            }
            let e = ep(100, "web", Some(Ipv4Addr::new(10, 0, 1, 250)));
            r.apply(&Change { network: "n".into(), id: e.id.clone(), old: None, new: Some(std::sync::Arc::new(e)) });
        });
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let addr = udp.local_addr().expect("addr");
        let tcp = std::net::TcpListener::bind(addr).expect("tcp on the same port");
        let l = serve(shared.clone(), vec!["n".into()], udp, tcp).expect("serve");
        (shared, l, addr)
    }

    fn query(name: &str, t: RecordType, class: DNSClass, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
        let mut q = Query::query(Name::from_ascii(name).expect("name"), t);
        q.set_query_class(class);
        m.add_query(q);
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().expect("encode")
    }

    async fn udp_ask(to: SocketAddr, q: &[u8]) -> (Message, usize) {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        s.send_to(q, to).await.expect("send");
        let mut buf = vec![0u8; 65535];
        let (n, _) = tokio::time::timeout(Duration::from_secs(3), s.recv_from(&mut buf)).await.expect("an answer").expect("recv");
        (Message::from_vec(&buf[..n]).expect("parse"), n)
    }

    async fn tcp_ask(to: SocketAddr, q: &[u8]) -> Message {
        let mut s = tokio::net::TcpStream::connect(to).await.expect("connect");
        let mut msg = (q.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(q);
        s.write_all(&msg).await.expect("write");
        let mut lb = [0u8; 2];
        s.read_exact(&mut lb).await.expect("len");
        let mut buf = vec![0u8; u16::from_be_bytes(lb) as usize];
        s.read_exact(&mut buf).await.expect("body");
        Message::from_vec(&buf).expect("parse")
    }

    /// Reads until EOF or `within`: true if the server closed the connection.
    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut b = [0u8; 64];
        matches!(tokio::time::timeout(within, s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
    }

    #[tokio::test]
    async fn tcp_is_bounded_per_address_and_by_deadlines() {
        let (_shared, _l, addr) = start(vec![]).await;
        // 32 connections from one address are the cap: the 33rd is closed at once.
        let mut held = Vec::new();
        for _ in 0..TCP_LIMITS.per_peer {
            held.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        let mut extra = tokio::net::TcpStream::connect(addr).await.expect("the kernel accepts it");
        assert!(closed_within(&mut extra, Duration::from_secs(2)).await, "over the per-address cap: closed");
        // The held ones still answer.
        let q = query("web.", RecordType::A, DNSClass::IN, None);
        let mut msg = (q.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(&q);
        held[0].write_all(&msg).await.expect("write");
        let mut lb = [0u8; 2];
        held[0].read_exact(&mut lb).await.expect("an answer on a held connection");
        // Closing them frees their places.
        held.clear();
        let m = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                if s.write_all(&msg).await.is_ok() && s.read_exact(&mut lb).await.is_ok() {
                    let mut buf = vec![0u8; u16::from_be_bytes(lb) as usize];
                    s.read_exact(&mut buf).await.expect("body");
                    return Message::from_vec(&buf).expect("parse");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("a place again once the held connections closed");
        assert_eq!(m.answers.len(), 1);
        // Half a length prefix, or a prefix without its body: closed after the deadline.
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(&[0]).await.expect("write");
        let mut body_less = tokio::net::TcpStream::connect(addr).await.expect("connect");
        body_less.write_all(&[0xff, 0xff, 1, 2, 3]).await.expect("write");
        assert!(!closed_within(&mut slow, Duration::from_secs(2)).await, "not before the deadline");
        assert!(closed_within(&mut slow, TCP_IDLE + Duration::from_secs(3)).await, "half a prefix: closed at the deadline");
        assert!(closed_within(&mut body_less, Duration::from_secs(3)).await, "a body that never comes: closed at the deadline");
        // Garbage with a query header over TCP: FORMERR, not a crash.
        let mut g = query("web.", RecordType::A, DNSClass::IN, None);
        g[12] = 63;
        let m = tcp_ask(addr, &g).await;
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    }

    #[tokio::test]
    async fn the_socketless_udp_path_answers_like_the_socket() {
        let (shared, _l, _addr) = start(vec![]).await;
        let from: SocketAddr = "10.0.1.9:5353".parse().expect("addr");
        let out = answer_datagram(shared.clone(), vec!["n".into()], &query("web.", RecordType::A, DNSClass::IN, None), from).await;
        assert_eq!(out.len(), 1);
        assert_eq!(Message::from_vec(&out[0]).expect("parse").answers.len(), 1);
        // Not a query header: dropped; a forwarded name: nothing here.
        assert!(answer_datagram(shared.clone(), vec!["n".into()], &[0u8; 3], from).await.is_empty());
        assert!(answer_datagram(shared, vec!["n".into()], &query("example.org.", RecordType::A, DNSClass::IN, None), from).await.is_empty());
    }

    #[tokio::test]
    async fn answers_truncation_tcp_and_bad_input() {
        let (shared, _l, addr) = start(vec![]).await;
        let (m, _) = udp_ask(addr, &query("web.", RecordType::A, DNSClass::IN, None)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].ttl, 2);

        let (m, n) = udp_ask(addr, &query("tasks.big.", RecordType::A, DNSClass::IN, None)).await;
        assert!(m.metadata.truncation, "40 A records do not fit 512 bytes");
        assert!(n <= 512);
        let (m, _) = udp_ask(addr, &query("tasks.big.", RecordType::A, DNSClass::IN, Some(4096))).await;
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 40, "EDNS 4096 fits them all");
        let m = tcp_ask(addr, &query("tasks.big.", RecordType::A, DNSClass::IN, None)).await;
        assert_eq!(m.answers.len(), 40);

        let (m, _) = udp_ask(addr, &query("web.", RecordType::AAAA, DNSClass::IN, None)).await;
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
        let (m, _) = udp_ask(addr, &query("tasks.nothing.", RecordType::A, DNSClass::IN, None)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let (m, _) = udp_ask(addr, &query("web.", RecordType::A, DNSClass::CH, None)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        let (m, _) = udp_ask(addr, &query("web.", RecordType::AXFR, DNSClass::IN, None)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        let (m, _) = udp_ask(addr, &query("250.1.0.10.in-addr.arpa.", RecordType::PTR, DNSClass::IN, None)).await;
        assert_eq!(m.answers.len(), 1, "PTR of the VIP");
        // Reverse zones no server names are answered here (this resolver has no upstream:
        // a forward would come back SERVFAIL).
        for q in ["0.0.0.0.in-addr.arpa.", "1.0.0.127.in-addr.arpa.", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa."] {
            let (m, _) = udp_ask(addr, &query(q, RecordType::PTR, DNSClass::IN, None)).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{q}");
        }

        // Garbage, a truncated header and a query with a mangled name: never a crash.
        let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        for g in [vec![0u8; 3], vec![0xffu8; 600], {
            let mut q = query("web.", RecordType::A, DNSClass::IN, None);
            q[12] = 63;
            q
        }] {
            junk.send_to(&g, addr).await.expect("send");
        }
        // Only the mangled query has a query header: it alone gets an answer, FORMERR.
        let mut buf = [0u8; 512];
        let (n, _) = tokio::time::timeout(Duration::from_secs(3), junk.recv_from(&mut buf)).await.expect("FORMERR").expect("recv");
        assert_eq!((n, buf[0], buf[1], buf[3] & 0x0f), (12, 4242u16.to_be_bytes()[0], 4242u16.to_be_bytes()[1], 1), "FORMERR under the query's id");
        // No upstream: names that are not ours get SERVFAIL.
        let (m, _) = udp_ask(addr, &query("example.com.", RecordType::A, DNSClass::IN, None)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        let (m, _) = udp_ask(addr, &query("web.", RecordType::A, DNSClass::IN, None)).await;
        assert_eq!(m.answers.len(), 1, "still answering after garbage");
        assert!(shared.counters.upstream_failures.load(Ordering::Relaxed) >= 1);
    }

    #[tokio::test]
    async fn forwards_unchanged_and_shuffles() {
        // An upstream that answers NXDOMAIN with one authority record for everything.
        let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let up_addr = up.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = up.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
                let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                r.metadata.response_code = ResponseCode::NXDomain;
                r.metadata.recursion_available = true;
                r.queries = q.queries.clone();
                let soa_name = Name::from_ascii("example.").expect("name");
                r.authorities.push(Record::from_rdata(soa_name, 60, RData::A(A(Ipv4Addr::new(192, 0, 2, 1)))));
                let _ = up.send_to(&r.to_vec().expect("encode"), from).await;
            }
        });
        let (_s, _l, addr) = start(vec![up_addr]).await;
        let (m, _) = udp_ask(addr, &query("missing.example.", RecordType::A, DNSClass::IN, None)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.authorities.len(), 1);
        assert_eq!(m.metadata.id, 4242);
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let m = tcp_ask(addr, &query("tasks.big.", RecordType::A, DNSClass::IN, None)).await;
            firsts.insert(format!("{:?}", m.answers[0].data));
        }
        assert!(firsts.len() > 1, "the order changes per query");
    }
}
