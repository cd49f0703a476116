//! Gossip for swarmnet, without I/O: SWIM membership and failure detection (foca), and the
//! replicated endpoint table. A caller feeds it packets and the time, and sends what it
//! asks to send; `memnet` runs many of them over an in-memory network for tests.
//!
//! Wire: every packet starts `S N <version> <kind>` (version 3); kind 1 is a foca packet, kind 2 one of our
//! `Wire` messages (postcard). UDP packets are at most `max_packet` bytes; bulk messages
//! (digests and owner sets) go over a reliable stream (TCP). Room is left in the header for
//! an encrypted kind later.

mod ident;
pub mod memnet;
pub mod seal;
#[cfg(feature = "server")]
pub mod server;
pub mod sim;
pub mod table;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use foca::{AccumulatingRuntime, Foca, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

pub use ident::{interned, name, Ident, IdentParts};
use swarmnet_types::{Change, Endpoint};
use table::Applied;
pub use table::{Item, NodeId, OwnerSet, Summary, Table};

/// The last byte is the wire version: 2 since ports carry a protocol enum (issue 8), 3 since
/// pushed changes are acknowledged (issue 23), 4 since membership records ride SWIM's
/// broadcasts, 5 since they are exchanged by bucket.
pub const MAGIC: [u8; 3] = [b'S', b'N', 5];
const KIND_FOCA: u8 = 1;
const KIND_WIRE: u8 = 2;
/// Largest reliable message accepted.
pub const MAX_STREAM_MESSAGE: usize = 16 << 20;

impl foca::Identity for Ident {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(self.with_gen(self.gen + 1))
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.gen > adversary.gen
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub probe_period: Duration,
    pub probe_rtt: Duration,
    pub suspect_to_down: Duration,
    pub anti_entropy: Duration,
    pub tombstone_ttl: Duration,
    pub max_packet: usize,
    /// A member declared down whose host does not answer a probe within this time is dead:
    /// its entries go (issue 12: a dead host still leaves every kernel quickly).
    pub host_probe_wait: Duration,
    /// A member declared down whose host still answers (its agent died, the host did not)
    /// keeps its entries, and so the data path of its live tasks, for at most this long;
    /// its leaving the manager's node list ends it sooner.
    pub dead_agent_hold: Duration,
    /// After an owner comes back with a newer generation, its older entries that it did not
    /// publish again within this time are dropped.
    pub handover: Duration,
    /// A node with no live member announces itself to the known nodes this often (after
    /// a partition, under a new generation: the others declared the old one dead).
    pub rejoin_every: Duration,
    /// Streams (7946 TCP) open at once, in total and from one address (server only).
    pub max_streams: usize,
    pub max_streams_per_peer: usize,
    /// Exchanges (push-pull over a stream) this node starts and has not had answered, at
    /// most: anti-entropy and the exchanges with new members wait for a free one, so a
    /// join storm cannot make every node sync with every other at once (memberlist's
    /// push-pull storms, its cap of 128). A network join's fetch is not held back.
    pub max_syncs: usize,
    /// An exchange not answered within this time no longer counts against `max_syncs`.
    pub sync_timeout: Duration,
    /// Exchanges carrying this node's whole SWIM view it answers in each one-second window,
    /// at most; past that it answers without the view (a joining node learns
    /// the members from the others, and from SWIM's own gossip). Bounds what one seed sends
    /// when thousands join through it.
    pub full_replies_per_sec: u32,
    /// A pushed change (or membership record) not acknowledged in time is sent again, up
    /// to `push_tries` sends in all: a lost datagram costs a round trip and a little, not
    /// an anti-entropy round. The time is measured (RFC 6298's smoothed round trip plus
    /// four times its variation, from acks and probes) and kept between `min_retransmit`
    /// and `max_retransmit`; `retransmit` until a round trip has been measured.
    pub retransmit: Duration,
    pub min_retransmit: Duration,
    pub max_retransmit: Duration,
    pub push_tries: u8,
    /// What may be sent again: `retransmit_percent` of the pushes sent first, plus
    /// `retransmits_per_sec` (so that a lone lost push is still sent again). A push due again
    /// past the budget waits another timeout without counting a try. When every push is
    /// late, the node is overloaded (its peers are slow to answer, not losing packets):
    /// sending all again would double the load that made them late (issue 23: 300 instances
    /// on 2 cores collapsed under six sends of every membership push).
    pub retransmit_percent: u32,
    pub retransmits_per_sec: u32,
    /// Pushes awaiting an acknowledgement, at most; past it pushes go unacknowledged
    /// (anti-entropy repairs what they lose).
    pub max_unacked: usize,
}

impl Default for Config {
    /// Tuned for a LAN: a dead node is declared within about 1.5 s (ADR 0032).
    fn default() -> Self {
        Config {
            probe_period: Duration::from_millis(200),
            probe_rtt: Duration::from_millis(100),
            suspect_to_down: Duration::from_millis(1000),
            anti_entropy: Duration::from_secs(10),
            tombstone_ttl: Duration::from_secs(60),
            max_packet: 1400,
            host_probe_wait: Duration::from_secs(1),
            dead_agent_hold: Duration::from_secs(60),
            handover: Duration::from_secs(5),
            rejoin_every: Duration::from_secs(1),
            max_streams: 512,
            max_streams_per_peer: 32,
            max_syncs: 3,
            sync_timeout: Duration::from_secs(5),
            full_replies_per_sec: 32,
            retransmit: Duration::from_millis(150),
            min_retransmit: Duration::from_millis(20),
            max_retransmit: Duration::from_secs(1),
            push_tries: 6,
            retransmit_percent: 10,
            retransmits_per_sec: 20,
            max_unacked: 16384,
        }
    }
}

impl Config {
    fn foca(&self, cluster_size: u32) -> foca::Config {
        let mut c = foca::Config::new_lan(NonZeroU32::new(cluster_size.max(1)).unwrap_or(NonZeroU32::MIN));
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.suspect_to_down_after = self.suspect_to_down;
        // Our 4-byte header goes in front of foca's packet: a full one must still fit.
        c.max_packet_size = NonZeroUsize::new(self.max_packet.saturating_sub(4)).unwrap_or(NonZeroUsize::MIN);
        // Membership updates ride on every message to anyone; in a small cluster a
        // suspicion's few transmissions are spent in one probe round, and a node cut off for
        // that round never hears it is suspected, so cannot refute it. Send them longer.
        c.max_transmissions = c.max_transmissions.max(std::num::NonZeroU8::new(12).unwrap_or(std::num::NonZeroU8::MIN));
        // Membership updates (a suspicion, a death) spread every 100 ms to 4 members; foca
        // sends nothing when it has no update, so this costs bytes only when news exists.
        c.periodic_gossip = Some(foca::PeriodicParams { frequency: Duration::from_millis(100), num_members: NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN) });
        c.periodic_announce = Some(foca::PeriodicParams { frequency: Duration::from_secs(30), num_members: NonZeroUsize::MIN });
        // After a partial partition (this node lost some members, not all), tell the ones
        // declared down that we are here, and tell a member we hold for dead that it is
        // (it renews its identity and rejoins): heals in seconds, not foca's 65 s default.
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams { frequency: Duration::from_secs(2), num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN) });
        c.notify_down_members = true;
        c
    }
}

/// Which networks a node has joined, owned and versioned by that node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub owner: NodeId,
    pub gen: u64,
    pub version: u64,
    pub networks: BTreeSet<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Wire {
    /// Changes pushed by their owner.
    Items {
        items: Vec<Item>,
    },
    /// Anti-entropy: what the sender has; the receiver answers with what the sender lacks
    /// and, unless this is a reply, a digest of its own.
    Digest {
        from: NodeId,
        reply: bool,
        membership: Membership,
        /// Checksum of every membership record the sender holds.
        memberships_sum: u64,
        /// On a mismatch of `memberships_sum` (in a reply): the checksums of the records by
        /// owner bucket (`record_buckets`), so that only the records of buckets that differ
        /// are exchanged (`Sync::want`). Empty otherwise.
        buckets: Vec<u64>,
        nets: BTreeMap<String, BTreeMap<NodeId, Summary>>,
        /// The sender's whole SWIM view (push-pull, as memberlist does on join), so a
        /// joining node learns every member at once instead of one packet's worth.
        swim: Vec<foca::Member<Ident>>,
        /// Checksum of the live members the sender knows (itself included): when it differs
        /// from the receiver's, the reply carries the whole view (unless
        /// `full_replies_per_sec` is spent).
        members_sum: u64,
        /// The sender's gossip address: where the reply goes when the receiver does not
        /// know the sender yet (a stream comes from an ephemeral port).
        addr: SocketAddr,
    },
    Sync {
        from: NodeId,
        memberships: Vec<Membership>,
        sets: Vec<OwnerSet>,
        /// Buckets (of `buckets` in all) whose records differ: the receiver answers with its
        /// own records there (a `Sync` without `want`, to `addr`).
        want: Vec<u32>,
        buckets: u32,
        addr: SocketAddr,
    },
    /// `Items` that the receiver acknowledges (`Ack` with the same number).
    ItemsAcked {
        seq: u64,
        items: Vec<Item>,
    },
    Ack {
        seq: u64,
    },
}

/// A membership record as a node holds it: the owner is the key of the map, and the
/// networks' names are shared (with 10,000 members, a `BTreeSet<String>` per record was
/// most of a node's memory).
#[derive(Clone, Debug)]
struct Held {
    gen: u64,
    version: u64,
    networks: Nets,
    /// This node has passed the record on (it came in a broadcast, or is its own); one
    /// learned from anti-entropy is passed on when a broadcast of it comes (otherwise
    /// nodes that caught up by anti-entropy would end the broadcast's spread early).
    relayed: bool,
}

/// A shared list of network names behind a thin pointer (a record's 8 bytes, not 16: every
/// node holds a record per member).
#[derive(Clone, Debug, Default)]
struct Nets(Arc<Box<[Arc<str>]>>);

impl std::ops::Deref for Nets {
    type Target = [Arc<str>];

    fn deref(&self) -> &[Arc<str>] {
        &self.0
    }
}

impl std::borrow::Borrow<[Arc<str>]> for Nets {
    fn borrow(&self) -> &[Arc<str>] {
        &self.0
    }
}

impl PartialEq for Nets {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Nets {}

impl std::hash::Hash for Nets {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (**self).hash(h)
    }
}

/// Network names, and lists of them (most nodes are on the same few networks), each held
/// once.
#[derive(Default)]
struct Names(std::collections::HashSet<Arc<str>>, std::collections::HashSet<Nets>);

impl Names {
    /// More distinct names than this are held apart (not shared): a bound on what peers
    /// can make this set grow to.
    const MAX: usize = 65536;

    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.0.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        if self.0.len() < Self::MAX {
            self.0.insert(n.clone());
        }
        n
    }

    fn hold(&mut self, m: &Membership) -> Held {
        let list: Vec<Arc<str>> = m.networks.iter().map(|n| self.get(n)).collect();
        let networks = match self.1.get(list.as_slice()) {
            Some(l) => l.clone(),
            None => {
                let l = Nets(Arc::new(list.into_boxed_slice()));
                if self.1.len() < Self::MAX {
                    self.1.insert(l.clone());
                }
                l
            }
        };
        Held { gen: m.gen, version: m.version, networks, relayed: false }
    }

    /// Drops the names and lists no record uses any more.
    fn prune(&mut self) {
        self.1.retain(|l| Arc::strong_count(&l.0) > 1);
        self.0.retain(|n| Arc::strong_count(n) > 1);
    }
}

impl Held {
    fn membership(&self, owner: &str) -> Membership {
        Membership { owner: owner.to_string(), gen: self.gen, version: self.version, networks: self.networks.iter().map(|n| n.to_string()).collect() }
    }
}

/// The membership records this node holds, inside foca as its custom broadcast handler:
/// a node's record (the networks it joined) spreads as SWIM's own updates do, piggybacked
/// on probes and on the periodic gossip to a few members, each node passing on what is new
/// to it a bounded number of times. Pushing each change to every member cost N^2
/// datagrams when a cluster joined a network (issue 23: 300 instances on 2 cores
/// collapsed). Anti-entropy still repairs what this misses, in bulk.
#[derive(Default)]
struct Book {
    me: NodeId,
    /// Keyed by the process's shared copy of each name ([`ident::name`]).
    memberships: BTreeMap<Arc<str>, Held>,
    names: Names,
    /// Records received that were not newer than ours.
    stale: u64,
    /// Owners declared down, with the generation that died and until when it is kept out: a
    /// copy of its record still in flight must not bring it back (every node would store
    /// and pass it on again). Kept for the tombstone time, as the table's dead owners are.
    gone: BTreeMap<Arc<str>, (u64, Instant)>,
    /// Peers whose newer record names networks their older one did not (or that were not
    /// known before), with those networks: the node pushes them its own entries there
    /// (`Gossip::greet_joiners`).
    joins: Vec<(NodeId, Vec<Arc<str>>)>,
    /// A peer's record new to this node came by gossip since `Gossip` last looked: records
    /// are changing, and gossip leaves a few nodes without some of them.
    fresh: bool,
    /// Owners of records held whose owner was not alive at the last scan ([`Book::drop_orphans`]).
    orphans: HashSet<Arc<str>>,
}

impl Book {
    /// Keeps `m` if it is newer than what this node holds (this node's own record only
    /// from this node: `own`). True when it is to be passed on: it came in a broadcast
    /// (`broadcast`, or `own`) and this node has not passed it on yet.
    fn apply(&mut self, m: &Membership, own: bool, broadcast: bool) -> bool {
        if let Some(relay) = self.known(&m.owner, m.gen, m.version, own, broadcast) {
            return relay;
        }
        let relay = own || broadcast;
        let mut held = self.names.hold(m);
        held.relayed = relay;
        if !own {
            let before = self.memberships.get(m.owner.as_str()).map(|h| h.networks.clone()).unwrap_or_default();
            let added: Vec<Arc<str>> = held.networks.iter().filter(|n| !before.contains(n)).cloned().collect();
            if !added.is_empty() {
                self.joins.push((m.owner.clone(), added));
            }
        }
        self.memberships.insert(ident::name(&m.owner), held);
        self.gone.remove(m.owner.as_str());
        self.fresh |= broadcast && !own;
        relay
    }

    /// Drops the records of owners not alive (`alive`) at this scan and the one before
    /// (scans a tombstone time apart), and keeps them out `until` then. A record
    /// comes before its owner is seen up in a join, so one scan is not enough; a record of
    /// an owner this node never saw alive (it died before this node joined) was never
    /// dropped by a death, and anti-entropy passed it back to nodes whose tombstone had
    /// expired. Returns how many went.
    fn drop_orphans(&mut self, alive: impl Fn(&str) -> bool, until: Instant) -> usize {
        let me = self.me.as_str();
        let orphans: HashSet<Arc<str>> = self.memberships.keys().filter(|o| &***o != me && !alive(o)).cloned().collect();
        let mut gone = 0;
        for o in orphans.intersection(&self.orphans) {
            if let Some(held) = self.memberships.remove(o) {
                self.gone.insert(o.clone(), (held.gen, until));
                gone += 1;
            }
        }
        self.orphans = orphans.into_iter().filter(|o| self.memberships.contains_key(o)).collect();
        gone
    }

    /// `data` is, byte for byte, `owner`'s record held (no other tail, nothing appended:
    /// it is passed on as received).
    fn agrees(&self, owner: &str, data: &[u8]) -> bool {
        self.memberships.get(owner).and_then(|h| postcard::to_allocvec(&h.membership(owner)).ok()).is_some_and(|mine| mine == data)
    }

    /// `id` is alive: a tombstone of its generation or older goes.
    fn revive(&mut self, id: &Ident) {
        if self.gone.get(id.node.as_str()).is_some_and(|&(dead, _)| dead <= id.gen) {
            self.gone.remove(id.node.as_str());
        }
    }

    /// Decides about a record from its owner and stamp alone, when it is not new to this
    /// node (or not to be taken): Some(to be passed on). None: new, to be taken whole.
    /// Gossip brings each record many times, and most copies end here, undecoded.
    fn known(&mut self, owner: &str, gen: u64, version: u64, own: bool, broadcast: bool) -> Option<bool> {
        if (owner == self.me) != own {
            return Some(false);
        }
        // (A newer generation's record clears the tombstone once it is decoded and kept:
        // `apply`.)
        if self.gone.get(owner).is_some_and(|&(dead, _)| gen <= dead) {
            if !broadcast {
                self.stale += 1;
            }
            return Some(false);
        }
        let relay = own || broadcast;
        match self.memberships.get_mut(owner) {
            Some(cur) if (gen, version) == (cur.gen, cur.version) && relay && !cur.relayed => {
                cur.relayed = true;
                Some(true)
            }
            Some(cur) if (gen, version) <= (cur.gen, cur.version) => {
                // Only an older record from anti-entropy counts as stale.
                if !broadcast {
                    self.stale += 1;
                }
                Some(false)
            }
            _ => None,
        }
    }
}

/// Lifeguard's local health multiplier (ADR 0032): a score this node raises when it sees
/// itself slow or unreachable, and lowers with each probe answered in time. Its judgements
/// of others (the wait for a probe's answer, the next probe, a suspicion's time to death)
/// take (score + 1) times as long: a node starved of CPU, or cut off, slows down before it
/// declares healthy members dead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Health {
    score: u32,
}

impl Health {
    /// memberlist's `AwarenessMaxMultiplier` is 8.
    const MAX_SCORE: u32 = 7;

    fn multiplier(self) -> u32 {
        self.score + 1
    }

    fn raise(&mut self) {
        self.score = (self.score + 1).min(Self::MAX_SCORE);
    }

    fn lower(&mut self) {
        self.score = self.score.saturating_sub(1);
    }

    /// The delay foca asked for `timer`, scaled if it is a judgement of others.
    fn scale(self, after: Duration, timer: &Timer<Ident>) -> Duration {
        match timer {
            Timer::ProbeRandomMember(_) | Timer::SendIndirectProbe { .. } | Timer::ChangeSuspectToDown { .. } => after * self.multiplier(),
            _ => after,
        }
    }
}

/// The head of an encoded [`Membership`] (its fields in order), borrowed from the packet.
#[derive(Deserialize)]
struct RecordHead<'a> {
    owner: &'a str,
    gen: u64,
    version: u64,
}

/// At most this many record buckets in a digest (8 KiB of checksums).
const MAX_RECORD_BUCKETS: usize = 1024;

/// How many buckets the membership records are checksummed in: about 16 records each, a
/// power of two.
fn record_buckets(records: usize) -> usize {
    (records / 16).next_power_of_two().clamp(1, MAX_RECORD_BUCKETS)
}

/// The bucket of `owner`'s record, of `n` (a power of two).
fn record_bucket(owner: &str, n: usize) -> usize {
    (table::fnv(owner.as_bytes(), 0, 0) as usize) & (n - 1)
}

/// The parts [`Gossip::shed`] drops, in its order.
#[doc(hidden)]
pub const HEAP_PARTS: [&str; 5] = ["membership records", "alive map", "endpoint table", "timers and probes", "foca"];

/// The largest membership record passed on by gossip: half a packet leaves room for foca's
/// header (two identities) and its updates.
const MAX_BROADCAST_RECORD: usize = 600;

/// What a membership broadcast is known by in foca's queue: its owner (a newer record
/// replaces the older one still being passed on), the process's shared copy of the name
/// (a mass network join queues about one per member on every node).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct OwnerKey(Arc<str>);

impl foca::Invalidates for OwnerKey {
    fn invalidates(&self, other: &Self) -> bool {
        self == other
    }

    const EQUAL_ONLY: bool = true;
}

#[derive(Debug, thiserror::Error)]
#[error("malformed membership record in a SWIM message")]
struct MalformedRecord;

impl foca::BroadcastHandler<Ident> for Book {
    type Key = OwnerKey;
    type Error = MalformedRecord;

    fn receive_item(&mut self, data: &[u8], sender: Option<&Ident>) -> Result<Option<OwnerKey>, MalformedRecord> {
        // `sender` is None for this node's own record (`Foca::add_broadcast`). A record
        // too large to share a packet with foca's header is kept, not passed on (it would
        // never fit and stay queued): anti-entropy carries it.
        let own = sender.is_none();
        let fits = data.len() <= MAX_BROADCAST_RECORD;
        // A copy of a record held already is decided on its head (no allocation).
        if let Ok((h, _)) = postcard::take_from_bytes::<RecordHead>(data) {
            if let Some(relay) = self.known(h.owner, h.gen, h.version, own, true) {
                // Passed on as received: only a copy that is, byte for byte, the record
                // held (its head alone could front any tail).
                if relay && !self.agrees(h.owner, data) {
                    if let Some(cur) = self.memberships.get_mut(h.owner) {
                        cur.relayed = false;
                    }
                    return Err(MalformedRecord);
                }
                return Ok((relay && fits).then(|| OwnerKey(ident::name(h.owner))));
            }
        }
        let m: Membership = postcard::from_bytes(data).map_err(|_| MalformedRecord)?;
        let relay = self.apply(&m, own, true);
        Ok((relay && fits).then(|| OwnerKey(ident::name(&m.owner))))
    }
}

/// A live member, known by its node's name.
#[derive(Clone, Debug)]
struct ByNode(Ident);

impl PartialEq for ByNode {
    fn eq(&self, other: &Self) -> bool {
        self.0.node == other.0.node
    }
}

impl Eq for ByNode {}

impl PartialOrd for ByNode {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByNode {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.node.cmp(&other.0.node)
    }
}

impl std::borrow::Borrow<str> for ByNode {
    fn borrow(&self) -> &str {
        &self.0.node
    }
}

/// The live members, one identity per node: the shared identity only, no copy of the name
/// as a key (10,000 members on each of 10,000 simulated nodes).
#[derive(Default)]
struct Alive(BTreeSet<ByNode>);

impl Alive {
    fn get(&self, node: &str) -> Option<&Ident> {
        self.0.get(node).map(|b| &b.0)
    }

    /// Adds `id`, or replaces its node's identity.
    fn insert(&mut self, id: Ident) {
        self.0.replace(ByNode(id));
    }

    fn remove(&mut self, node: &str) {
        self.0.remove(node);
    }

    fn values(&self) -> impl Iterator<Item = &Ident> {
        self.0.iter().map(|b| &b.0)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A push sent and not yet acknowledged.
#[derive(Clone, Debug)]
struct Unacked {
    to: SocketAddr,
    data: Vec<u8>,
    sent: u8,
    first: Instant,
}

/// Something to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    Udp {
        to: SocketAddr,
        data: Vec<u8>,
    },
    Stream {
        to: SocketAddr,
        data: Vec<u8>,
    },
    /// Is `node`'s host up? (A TCP connect to its gossip address: accepted or refused, the
    /// host answers.) The answer comes back as [`Gossip::host_alive`].
    Probe {
        node: Ident,
    },
}

// Events are short-lived and handed on at once; boxing the common variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Endpoint(Change),
    NodeUp(Ident),
    NodeDown(Ident),
    /// This node lost every member and rejoins under a new generation.
    Renewed(Ident),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets and stream messages that did not open with this node's gossip keys (or came
    /// before it had any): dropped unparsed.
    pub unauthenticated: u64,
    pub malformed: u64,
    /// Exchanges from senders not known yet that named a gossip address on another host
    /// than the one they came from: not answered ([`Gossip::reply_to`]).
    pub unanswered: u64,
    pub oversized: u64,
    pub stale: u64,
    pub udp_sent: u64,
    pub udp_bytes: u64,
    pub stream_bytes: u64,
    /// Bytes the sealing added on top of `udp_bytes` and `stream_bytes` (the server's).
    pub sealing_bytes: u64,
    /// Messages and bytes handed to the protocol (opened; datagrams and stream messages).
    pub received: u64,
    pub received_bytes: u64,
    /// Members this node's failure detector declared down.
    pub failures_detected: u64,
    /// Suspicions this node's own probes raised (each member and incarnation once: a
    /// timer of this node's may declare it down), and those its timer turned into a death
    /// (the rest were refuted in time, or another node's verdict came first).
    pub suspicions: u64,
    pub suspicions_to_death: u64,
    /// Suspicions of this node that it refuted (its incarnation rose).
    pub refutations: u64,
    /// Times this node was declared down and came back under a new generation (foca's
    /// rejoin), and times it lost every member and started over (`Gossip::rejoin`).
    pub rejoins: u64,
    pub renewals: u64,
    /// Pushes sent again for want of an acknowledgement, and given up on after the last try.
    pub retransmitted: u64,
    pub push_given_up: u64,
    /// Pushes due again that waited another timeout: the retransmission budget was spent.
    pub retransmits_deferred: u64,
    /// Exchanges not started because `max_syncs` were running, and full views not sent
    /// because `full_replies_per_sec` was spent.
    pub syncs_deferred: u64,
    pub full_replies_withheld: u64,
    /// Round trips of this node's direct probes (a ping to the ack that answers it).
    pub probe_rtt: swarmnet_types::metrics::LoopHistogram,
    /// Other members now, by state (filled in by [`Gossip::stats_now`]): alive; suspect
    /// (declared down by the failure detector, still probed before their entries go, ADR
    /// 0014); down (nodes the manager lists that are neither).
    pub members_alive: u64,
    pub members_suspect: u64,
    pub members_down: u64,
}

pub struct Gossip {
    me: Ident,
    cfg: Config,
    foca: Foca<Ident, PostcardCodec, StdRng, Book>,
    rt: AccumulatingRuntime<Ident>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_events: HashMap<u64, Timer<Ident>>,
    seq: u64,
    clock: u64,
    table: Table,
    alive: Alive,
    epoch: Instant,
    next_ae: Instant,
    next_reap: Instant,
    /// The next scan for records of owners not alive ([`Book::drop_orphans`]).
    next_orphan_scan: Instant,
    rng: StdRng,
    out: Vec<Out>,
    events: Vec<Event>,
    pub stats: Stats,
    /// Direct probes sent and not yet answered: (member, probe number) → when.
    probes: HashMap<(Ident, foca::ProbeNumber), Instant>,
    /// The manager's list of ready nodes (None: never given; then probes alone decide).
    known: Option<BTreeSet<SocketAddr>>,
    /// Where to announce ourselves: the known nodes, or the last seeds.
    seeds: Vec<SocketAddr>,
    /// Members declared down whose entries are kept while their host is probed.
    suspects: BTreeMap<NodeId, Suspect>,
    /// Handovers to finish: (when, owner, its new generation).
    handovers: Vec<(Instant, NodeId, u64)>,
    /// We had members and lost them all: renew our identity before announcing again.
    lost_all: bool,
    next_rejoin: Instant,
    /// Exchanges started and not answered: peer → when started.
    syncing: HashMap<SocketAddr, Instant>,
    /// Full-view replies left in this second, and when the second began.
    full_replies: (u32, Instant),
    /// Pushes awaiting an acknowledgement, by number, and when each is next due again.
    unacked: HashMap<u64, Unacked>,
    resend: BinaryHeap<Reverse<(Instant, u64)>>,
    push_seq: u64,
    /// Owned items changed and not pushed yet (`push_items`).
    pending: Vec<Item>,
    /// Retransmissions the budget allows now, in hundredths, and when it was last refilled
    /// by time.
    retransmit_budget: u64,
    budget_refilled: Instant,
    /// Smoothed round trip and its variation, once one has been measured.
    rtt: Option<(Duration, Duration)>,
    /// Lifeguard's local health: how far this node's judgements of others are slowed.
    health: Health,
    /// foca's incarnation of this node when last looked at (a rise: it refuted a suspicion
    /// of itself).
    incarnation: u16,
    /// foca's count of suspicions raised, as last read (`Stats::suspicions` takes the rest).
    suspicions_seen: u64,
    /// The latest time an entry point was given (for the calls that are not given one).
    now: Instant,
    /// Joined (or started over), and no peer's view has agreed with ours yet: ask a random
    /// member for its view every second (the first answers may come without one, or from
    /// peers that are still joining themselves).
    want_view: bool,
    next_view: Instant,
    view_tries: u8,
}

/// A member declared down, its host under probe.
#[derive(Clone, Debug)]
struct Suspect {
    id: Ident,
    since: Instant,
    /// Its entries go at this time unless its host answers before.
    deadline: Instant,
    next_probe: Instant,
}

/// Shrinks a queue down to twice what it holds once it uses less than a quarter of its room.
fn trim_heap<T: Ord>(h: &mut BinaryHeap<T>) {
    if h.capacity() > 64 && h.len() < h.capacity() / 4 {
        h.shrink_to(h.len() * 2);
    }
}

/// The same for a map.
fn trim_map<K: Eq + std::hash::Hash, V>(m: &mut HashMap<K, V>) {
    if m.capacity() > 64 && m.len() < m.capacity() / 4 {
        m.shrink_to(m.len() * 2);
    }
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + body.len());
    v.extend_from_slice(&MAGIC);
    v.push(kind);
    v.extend_from_slice(body);
    v
}

impl Gossip {
    pub fn new(me: Ident, cfg: Config, seed: u64, now: Instant) -> Gossip {
        let membership = Membership { owner: me.node.clone(), gen: me.gen, version: 0, networks: BTreeSet::new() };
        let mut book = Book { me: me.node.clone(), ..Book::default() };
        book.apply(&membership, true, false);
        let foca = Foca::with_custom_broadcast(me.clone(), cfg.foca(8), StdRng::seed_from_u64(seed), PostcardCodec, book);
        let mut g = Gossip {
            foca,
            rt: AccumulatingRuntime::new(),
            timers: BinaryHeap::new(),
            timer_events: HashMap::new(),
            seq: 0,
            clock: 0,
            table: Table::default(),
            alive: Alive::default(),
            epoch: now,
            next_ae: now + cfg.anti_entropy,
            next_reap: now + Duration::from_secs(1),
            next_orphan_scan: now + cfg.tombstone_ttl,
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
            out: Vec::new(),
            events: Vec::new(),
            stats: Stats::default(),
            probes: HashMap::new(),
            known: None,
            seeds: Vec::new(),
            suspects: BTreeMap::new(),
            handovers: Vec::new(),
            lost_all: false,
            next_rejoin: now,
            syncing: HashMap::new(),
            full_replies: (cfg.full_replies_per_sec, now),
            unacked: HashMap::new(),
            resend: BinaryHeap::new(),
            push_seq: 0,
            pending: Vec::new(),
            retransmit_budget: 100 * u64::from(cfg.retransmits_per_sec),
            budget_refilled: now,
            rtt: None,
            health: Health::default(),
            incarnation: 0,
            suspicions_seen: 0,
            now,
            want_view: true,
            next_view: now + Duration::from_secs(1),
            view_tries: 0,
            me,
            cfg,
        };
        g.pump(now);
        g
    }

    pub fn me(&self) -> &Ident {
        &self.me
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Live members other than this node.
    pub fn members(&self) -> impl Iterator<Item = &Ident> {
        self.alive.values()
    }

    /// How many live members other than this node (what `members().count()` is, at once).
    pub fn member_count(&self) -> usize {
        self.alive.len()
    }

    /// Exchanges this node started that are running (unanswered, not yet timed out).
    pub fn syncs_running(&self) -> usize {
        self.syncing.values().filter(|t| self.now.saturating_duration_since(**t) < self.cfg.sync_timeout).count()
    }

    /// Pushes awaiting an acknowledgement.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    pub fn take_out(&mut self) -> Vec<Out> {
        self.greet_joiners();
        if !self.pending.is_empty() {
            let items = std::mem::take(&mut self.pending);
            self.send_items(items, None);
        }
        std::mem::take(&mut self.out)
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// The manager's list of ready nodes: joins through them, and a member declared down
    /// that is not on it is dead at once (no host probe, no hold).
    pub fn set_nodes(&mut self, nodes: &[SocketAddr], now: Instant) {
        self.now = self.now.max(now);
        let known: BTreeSet<SocketAddr> = nodes.iter().copied().collect();
        let gone: Vec<NodeId> = self.suspects.iter().filter(|(_, s)| !known.contains(&s.id.addr)).map(|(n, _)| n.clone()).collect();
        self.known = Some(known);
        for n in gone {
            self.suspect_dead(&n);
        }
        self.join_via(nodes, now);
    }

    /// A member's host answered a probe: keep its entries a while longer (bounded by
    /// `dead_agent_hold` from when it was declared down).
    pub fn host_alive(&mut self, id: &Ident, now: Instant) {
        let hold = self.cfg.dead_agent_hold;
        let wait = self.cfg.host_probe_wait;
        if let Some(s) = self.suspects.get_mut(&id.node).filter(|s| s.id == *id) {
            s.deadline = (now + 3 * wait).min(s.since + hold).max(s.deadline);
        }
    }

    /// Its host did not answer in time (or the manager dropped it): its entries go.
    fn suspect_dead(&mut self, node: &str) {
        if let Some(s) = self.suspects.remove(node) {
            let ch = self.table.owner_dead(&s.id.node, s.id.gen);
            self.emit(ch);
        }
    }

    /// Joins the cluster through known addresses.
    pub fn join_via(&mut self, seeds: &[SocketAddr], now: Instant) {
        self.now = self.now.max(now);
        self.seeds = seeds.iter().copied().filter(|s| *s != self.me.addr).collect();
        for s in seeds {
            if *s == self.me.addr {
                continue;
            }
            let placeholder = Ident::new(String::new(), *s, 0);
            let _ = self.foca.announce(placeholder, &mut self.rt);
        }
        self.pump(now);
    }

    /// When `tick` next has work to do.
    pub fn next_deadline(&self) -> Instant {
        let t = self.timers.peek().map(|Reverse((t, _))| *t);
        let suspects = self.suspects.values().map(|s| s.deadline.min(s.next_probe)).min();
        let handover = self.handovers.iter().map(|(t, _, _)| *t).min();
        let rejoin = self.isolated().then_some(self.next_rejoin);
        let resend = self.resend.peek().map(|Reverse((t, _))| *t);
        let view = (self.want_view && !self.alive.is_empty()).then_some(self.next_view);
        [Some(self.next_ae), Some(self.next_reap), t, suspects, handover, rejoin, resend, view].into_iter().flatten().min().unwrap_or(self.next_ae)
    }

    /// Runs what is due at `now`.
    pub fn tick(&mut self, now: Instant) {
        self.now = self.now.max(now);
        self.resend_due(now);
        while let Some(Reverse((t, seq))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            if let Some(ev) = self.timer_events.remove(&seq) {
                if let Timer::ProbeRandomMember(_) = ev {
                    // A probe round this late: this node's own process (or host) is slow,
                    // and what it would judge of others now it cannot trust as much.
                    if now.saturating_duration_since(t) > self.cfg.probe_period / 2 {
                        self.health.raise();
                    }
                }
                let verdict = matches!(ev, Timer::ChangeSuspectToDown { .. });
                let before = self.stats.failures_detected;
                let _ = self.foca.handle_timer(ev, &mut self.rt);
                self.pump(now);
                if verdict && self.stats.failures_detected > before {
                    self.stats.suspicions_to_death += 1;
                }
            }
        }
        if now >= self.next_ae {
            self.next_ae = now + self.cfg.anti_entropy;
            self.anti_entropy();
        }
        if self.want_view && !self.alive.is_empty() && now >= self.next_view {
            self.next_view = now + Duration::from_secs(1);
            // Views that keep changing (or a one-way link) must not make this go on: after
            // 30 tries, anti-entropy alone.
            self.view_tries += 1;
            if self.view_tries >= 30 {
                self.want_view = false;
            }
            let peers: Vec<SocketAddr> = self.alive.values().map(|i| i.addr).collect();
            let p = peers[self.rng.random_range(0..peers.len())];
            self.start_sync(p, true, false);
        }
        let due: Vec<NodeId> = self.suspects.iter().filter(|(_, s)| now >= s.deadline).map(|(n, _)| n.clone()).collect();
        for n in due {
            self.suspect_dead(&n);
        }
        let mut probes = Vec::new();
        for s in self.suspects.values_mut().filter(|s| now >= s.next_probe) {
            s.next_probe = now + self.cfg.host_probe_wait / 2;
            probes.push(Out::Probe { node: s.id.clone() });
        }
        self.out.extend(probes);
        let (done, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut self.handovers).into_iter().partition(|(t, _, _)| now >= *t);
        self.handovers = pending;
        for (_, owner, gen) in done {
            let ch = self.table.drop_older(&owner, gen);
            self.emit(ch);
        }
        if self.isolated() && now >= self.next_rejoin {
            self.next_rejoin = now + self.cfg.rejoin_every;
            self.rejoin(now);
        }
        if now >= self.next_reap {
            self.next_reap = now + Duration::from_secs(1);
            let ttl = u64::try_from(self.cfg.tombstone_ttl.as_millis()).unwrap_or(u64::MAX);
            let now_ms = self.ms(now);
            self.table.reap(now_ms, ttl);
            // Names no record uses any more, and dead owners past the tombstone time.
            let ttl = self.cfg.tombstone_ttl;
            let book = self.foca.broadcast_handler_mut();
            book.names.prune();
            book.gone.retain(|_, (_, until)| now < *until);
            if now >= self.next_orphan_scan {
                self.next_orphan_scan = now + ttl;
                let alive = &self.alive;
                // Kept out three tombstone times: longer than other nodes hold the record
                // before they drop it (one to two scans) and pass it around meanwhile.
                book.drop_orphans(|o| alive.get(o).is_some(), now + ttl * 3);
            }
            // Room the queues grew to while a cluster joined, not in use any more.
            self.rt.trim();
            trim_heap(&mut self.timers);
            trim_map(&mut self.timer_events);
            trim_map(&mut self.probes);
        }
    }

    /// Drops one part of this node's state (one of [`HEAP_PARTS`]), leaving the node unfit
    /// to run on: for the simulator's breakdown of where the heap goes.
    #[doc(hidden)]
    pub fn shed(&mut self, part: &str) {
        match part {
            "membership records" => {
                let book = self.foca.broadcast_handler_mut();
                book.memberships = BTreeMap::new();
                book.gone = BTreeMap::new();
                book.joins = Vec::new();
                book.names = Names::default();
            }
            "alive map" => self.alive = Alive::default(),
            "endpoint table" => self.table = Table::default(),
            "timers and probes" => {
                self.timers = BinaryHeap::new();
                self.timer_events = HashMap::new();
                self.probes = HashMap::new();
                self.rt = AccumulatingRuntime::new();
            }
            "foca" => {
                self.foca = Foca::with_custom_broadcast(self.me.clone(), self.cfg.foca(8), StdRng::seed_from_u64(0), PostcardCodec, Book::default());
                self.suspicions_seen = 0;
            }
            _ => {}
        }
    }

    /// How long a host probe may take.
    pub fn probe_timeout(&self) -> Duration {
        self.cfg.host_probe_wait / 2
    }

    /// No live member, and somewhere to announce ourselves.
    fn isolated(&self) -> bool {
        self.alive.is_empty() && !self.seeds.is_empty()
    }

    /// Announces this node to the known nodes. If it had members and lost them all (its
    /// link was cut, or everyone else restarted), the others have declared this identity
    /// dead, and it holds them for dead: start over with a fresh member list under a new
    /// generation, re-stamping what it owns, so that both sides take each other at once.
    fn rejoin(&mut self, now: Instant) {
        if self.lost_all {
            self.lost_all = false;
            let new = self.me.with_gen(self.me.gen + 1);
            let mut book = std::mem::take(self.foca.broadcast_handler_mut());
            // The new foca has passed nothing on yet.
            for held in book.memberships.values_mut() {
                held.relayed = false;
            }
            self.foca = Foca::with_custom_broadcast(new.clone(), self.cfg.foca(8), StdRng::seed_from_u64(new.gen ^ self.rng.random::<u64>()), PostcardCodec, book);
            self.suspicions_seen = 0;
            self.timers.clear();
            self.timer_events.clear();
            self.me = new;
            self.restamp(now);
            self.ask_views();
            self.syncing.clear();
            self.stats.renewals += 1;
            self.events.push(Event::Renewed(self.me.clone()));
        }
        let seeds = self.seeds.clone();
        for s in seeds {
            let placeholder = Ident::new(String::new(), s, 0);
            let _ = self.foca.announce(placeholder, &mut self.rt);
        }
        self.pump(now);
    }

    /// Newer generations the table saw: their older entries go after the handover time.
    fn schedule_handovers(&mut self, now: Instant) {
        for (owner, gen) in self.table.take_new_generations() {
            self.handovers.push((now + self.cfg.handover, owner, gen));
        }
    }

    /// A packet from `from`; `stream` if it came over the reliable channel.
    pub fn handle(&mut self, from: SocketAddr, data: &[u8], stream: bool, now: Instant) {
        self.now = self.now.max(now);
        self.stats.received += 1;
        self.stats.received_bytes += data.len() as u64;
        let limit = if stream { MAX_STREAM_MESSAGE } else { self.cfg.max_packet };
        if data.len() > limit {
            self.stats.oversized += 1;
            return;
        }
        if data.len() < 4 || data[..3] != MAGIC {
            self.stats.malformed += 1;
            return;
        }
        let body = &data[4..];
        match data[3] {
            KIND_FOCA if !stream => {
                if let Ok(h) = foca::Codec::<Ident>::decode_header(&mut PostcardCodec, body) {
                    if let foca::Message::Ack(n) = h.message {
                        if let Some(sent) = self.probes.remove(&(h.src, n)) {
                            let rtt = now.saturating_duration_since(sent);
                            self.stats.probe_rtt.observe(rtt);
                            self.observe_rtt(rtt);
                            // Answered within its wait: this node's view is sound.
                            if rtt <= self.cfg.probe_rtt * self.health.multiplier() {
                                self.health.lower();
                            }
                        }
                    }
                }
                if self.foca.handle_data(body, &mut self.rt).is_err() {
                    self.stats.malformed += 1;
                }
                self.pump(now);
            }
            KIND_WIRE => match postcard::from_bytes::<Wire>(body) {
                // Exchanges come by stream only (`send_stream`). A datagram's source
                // address can be forged, which would defeat `reply_to`'s check.
                Ok(Wire::Digest { .. } | Wire::Sync { .. }) if !stream => self.stats.malformed += 1,
                Ok(w) => self.handle_wire(from, w, now),
                Err(_) => self.stats.malformed += 1,
            },
            _ => self.stats.malformed += 1,
        }
    }

    /// `items` as a plaintext packet of this wire version, as a node pushes its changes
    /// before sealing (tests and tools: what a forger would send).
    pub fn plaintext_items(items: Vec<Item>) -> Option<Vec<u8>> {
        postcard::to_allocvec(&Wire::Items { items }).ok().map(|body| frame(KIND_WIRE, &body))
    }

    fn send_udp(&mut self, to: SocketAddr, w: &Wire) {
        if let Ok(body) = postcard::to_allocvec(w) {
            self.udp_out(to, frame(KIND_WIRE, &body));
        }
    }

    /// A framed datagram out, counted.
    fn udp_out(&mut self, to: SocketAddr, data: Vec<u8>) {
        self.stats.udp_sent += 1;
        self.stats.udp_bytes += data.len() as u64;
        self.out.push(Out::Udp { to, data });
    }

    /// Sends a push that the receiver acknowledges (`make(Some(seq))`), and sends it again
    /// until it does (`retransmit`, `push_tries`); past `max_unacked` waiting, `make(None)`
    /// goes unacknowledged.
    fn push_udp(&mut self, to: SocketAddr, make: impl Fn(Option<u64>) -> Wire) {
        if self.unacked.len() >= self.cfg.max_unacked {
            self.send_udp(to, &make(None));
            return;
        }
        self.push_seq += 1;
        let seq = self.push_seq;
        let Ok(body) = postcard::to_allocvec(&make(Some(seq))) else { return };
        let data = frame(KIND_WIRE, &body);
        self.udp_out(to, data.clone());
        self.retransmit_budget = (self.retransmit_budget + u64::from(self.cfg.retransmit_percent)).min(self.budget_cap());
        self.unacked.insert(seq, Unacked { to, data, sent: 1, first: self.now });
        self.resend.push(Reverse((self.now + self.retransmit_timeout(), seq)));
    }

    /// A round trip measured (RFC 6298: srtt += (r - srtt) / 8, rttvar += (|srtt - r| -
    /// rttvar) / 4).
    fn observe_rtt(&mut self, r: Duration) {
        self.rtt = Some(match self.rtt {
            None => (r, r / 2),
            Some((srtt, var)) => (srtt * 7 / 8 + r / 8, var * 3 / 4 + srtt.abs_diff(r) / 4),
        });
    }

    /// How long a push waits for its ack before it is sent again.
    pub fn retransmit_timeout(&self) -> Duration {
        match self.rtt {
            None => self.cfg.retransmit,
            Some((srtt, var)) => (srtt + var * 4).clamp(self.cfg.min_retransmit, self.cfg.max_retransmit.max(self.cfg.min_retransmit)),
        }
    }

    /// The most the retransmission budget holds (hundredths): a second of the floor, or the
    /// share of a full `max_unacked`.
    fn budget_cap(&self) -> u64 {
        100 * u64::from(self.cfg.retransmits_per_sec).max(self.cfg.max_unacked as u64 * u64::from(self.cfg.retransmit_percent) / 100)
    }

    /// Sends again the pushes not acknowledged in time: after the retransmission timeout
    /// (`retransmit_timeout`) for the first three tries, then twice as long each time; after
    /// the last, the push is given up. Each costs one of the retransmission budget; past it,
    /// the push waits another timeout.
    fn resend_due(&mut self, now: Instant) {
        // Whole milliseconds credited; the remainder counts at the next call.
        let ms = u64::try_from(now.saturating_duration_since(self.budget_refilled).as_millis()).unwrap_or(u64::MAX);
        if ms > 0 {
            let refill = ms.saturating_mul(u64::from(self.cfg.retransmits_per_sec)) / 10;
            self.retransmit_budget = (self.retransmit_budget.saturating_add(refill)).min(self.budget_cap());
            self.budget_refilled += Duration::from_millis(ms);
        }
        while let Some(Reverse((t, seq))) = self.resend.peek().copied() {
            if t > now {
                break;
            }
            self.resend.pop();
            let tries = self.cfg.push_tries;
            let rto = self.retransmit_timeout();
            let Some(u) = self.unacked.get_mut(&seq) else { continue };
            if u.sent >= tries {
                self.unacked.remove(&seq);
                self.stats.push_given_up += 1;
                continue;
            }
            if self.retransmit_budget < 100 {
                self.stats.retransmits_deferred += 1;
                self.resend.push(Reverse((now + rto, seq)));
                continue;
            }
            self.retransmit_budget -= 100;
            u.sent += 1;
            let wait = rto * (1u32 << u32::from(u.sent.saturating_sub(3)).min(4));
            let (to, data) = (u.to, u.data.clone());
            self.stats.retransmitted += 1;
            self.udp_out(to, data);
            self.resend.push(Reverse((now + wait, seq)));
        }
    }

    fn send_stream(&mut self, to: SocketAddr, w: &Wire) {
        if let Ok(body) = postcard::to_allocvec(w) {
            let data = frame(KIND_WIRE, &body);
            self.stats.stream_bytes += data.len() as u64;
            self.out.push(Out::Stream { to, data });
        }
    }

    /// The counters, and the members by state now.
    pub fn stats_now(&self) -> Stats {
        let mut s = self.stats.clone();
        s.stale += self.book().stale;
        s.members_alive = self.alive.len() as u64;
        s.members_suspect = self.suspects.len() as u64;
        s.members_down = self
            .known
            .as_ref()
            .map(|k| {
                let seen: std::collections::HashSet<SocketAddr> = self.alive.values().map(|i| i.addr).chain(self.suspects.values().map(|x| x.id.addr)).collect();
                k.iter().filter(|a| **a != self.me.addr && !seen.contains(*a)).count() as u64
            })
            .unwrap_or(0);
        s
    }

    /// Drains what foca asked for: packets, timers, notifications.
    fn pump(&mut self, now: Instant) {
        while let Some((to, data)) = self.rt.to_send() {
            if let Ok(h) = foca::Codec::<Ident>::decode_header(&mut PostcardCodec, &data[..]) {
                if let foca::Message::Ping(n) = h.message {
                    // Bounded: probes never answered are forgotten after a while.
                    if self.probes.len() >= 1024 {
                        self.probes.retain(|_, t| now.saturating_duration_since(*t) < Duration::from_secs(10));
                    }
                    self.probes.insert((h.dst, n), now);
                }
            }
            self.udp_out(to.addr, frame(KIND_FOCA, &data));
        }
        // Suspicions this node's probes raised (foca counts them; a new foca, after a
        // start over, counts from 0).
        let raised = self.foca.suspicions_raised();
        self.stats.suspicions += raised.wrapping_sub(self.suspicions_seen);
        self.suspicions_seen = raised;
        // A refutation of a suspicion of this node: others could not reach it in time.
        let incarnation = self.foca.current_incarnation();
        if incarnation != self.incarnation {
            if incarnation > self.incarnation {
                self.health.raise();
                self.stats.refutations += 1;
            }
            self.incarnation = incarnation;
        }
        while let Some((after, ev)) = self.rt.to_schedule() {
            let after = self.health.scale(after, &ev);
            self.seq += 1;
            self.timers.push(Reverse((now + after, self.seq)));
            self.timer_events.insert(self.seq, ev);
        }
        let mut notes = Vec::new();
        while let Some(n) = self.rt.to_notify() {
            notes.push(n);
        }
        for n in notes {
            self.notified(n, now);
        }
        // Records changed by gossip: an anti-entropy round a settling time later (once the
        // gossip is done), not the whole period later: the few nodes gossip missed catch up
        // in seconds (a mass network join took 10 s to reach every pair). A round already
        // due sooner stays; once it has run, the next one is a settling time away at the
        // earliest: records changing all the time cost at most one round per settling time.
        let book = self.foca.broadcast_handler_mut();
        if std::mem::take(&mut book.fresh) {
            self.next_ae = self.next_ae.min(now + self.cfg.anti_entropy / 4);
        }
    }

    /// Before an entry of `owner` is taken: the table learns the generation `owner` is alive
    /// at, so that a copy from an older one still in flight is stale (the table notes the
    /// generations of owners it holds entries of only, [`Table::owner_generation`]).
    fn note_live_generation(&mut self, owner: &str) {
        // Alive, or declared down and still held while its host is probed.
        let gen = self.alive.get(owner).map(|i| i.gen).max(self.suspects.get(owner).map(|s| s.id.gen));
        if let Some(gen) = gen {
            self.table.note_generation(owner, gen);
        }
    }

    fn notified(&mut self, n: OwnedNotification<Ident>, now: Instant) {
        match n {
            OwnedNotification::MemberUp(id) => {
                self.table.owner_generation(&id.node, id.gen);
                self.table.revive(&id.node, id.gen);
                if self.suspects.get(&id.node).is_some_and(|s| s.id.gen <= id.gen) {
                    self.suspects.remove(&id.node);
                }
                self.alive.insert(id.clone());
                self.events.push(Event::NodeUp(id.clone()));
                // A member came up: an anti-entropy round a settling time later, as for
                // records. In a cluster growing in waves, the few members of a wave that
                // SWIM's gossip did not bring to every node came at the next round, 10 s on.
                self.next_ae = self.next_ae.min(now + self.cfg.anti_entropy / 4);
                // Up at the generation it was declared dead with (this node was cut off and
                // started over; only it saw the others go): its records are taken again, as
                // the table takes its entries again (`revive`).
                self.foca.broadcast_handler_mut().revive(&id);
                // Its record came before it was up (gossip carries both, in any order):
                // `greet_joiners` passed it over then, so greet it now.
                let joined = self.table.joined();
                let book = self.foca.broadcast_handler_mut();
                if let Some(held) = book.memberships.get(id.node.as_str()) {
                    let nets: Vec<Arc<str>> = held.networks.iter().filter(|n| joined.contains(&***n)).cloned().collect();
                    if !nets.is_empty() {
                        book.joins.push((id.node.clone(), nets));
                    }
                }
                // A full exchange at once rather than at the next round: with our first few
                // members (we just joined), and with a newcomer at a probability that gives
                // it about 8 such exchanges cluster-wide. Every member doing it with every
                // newcomer costs O(N^2) stream connections when many join at once.
                // Both within `max_syncs`: past it, anti-entropy catches up.
                let n = self.alive.len();
                if n <= 8 || self.rng.random_range(0..n) < 8 {
                    self.start_sync(id.addr, true, false);
                }
            }
            // Our own earlier identity declared down (we were, and came back under a new
            // generation): our entries are ours to keep, `Rejoin` re-stamps them. Dropping
            // them here left `restamp` nothing to re-publish but what the agent sets again.
            OwnedNotification::MemberDown(id) if id.node == self.me.node => {}
            OwnedNotification::Rename(_, new) if new.node == self.me.node => {}
            OwnedNotification::MemberDown(id) => {
                self.stats.failures_detected += 1;
                if self.alive.get(&id.node).is_some_and(|a| a.gen <= id.gen) {
                    self.alive.remove(&id.node);
                    if self.alive.is_empty() {
                        self.lost_all = true;
                        self.next_rejoin = now + self.cfg.rejoin_every;
                    }
                }
                let book = self.foca.broadcast_handler_mut();
                if book.memberships.get(id.node.as_str()).is_some_and(|m| m.gen <= id.gen) {
                    book.memberships.remove(id.node.as_str());
                }
                if book.gone.get(id.node.as_str()).is_none_or(|&(g, _)| g < id.gen) {
                    book.gone.insert(ident::name(&id.node), (id.gen, now + self.cfg.tombstone_ttl));
                }
                // A dead agent is not a dead host: its entries stay while its host answers
                // a probe (its tasks may well be running), unless the manager no longer
                // lists the node.
                if self.known.as_ref().is_some_and(|k| !k.contains(&id.addr)) {
                    let ch = self.table.owner_dead(&id.node, id.gen);
                    self.emit(ch);
                } else {
                    let s = Suspect { id: id.clone(), since: now, deadline: now + self.cfg.host_probe_wait, next_probe: now + self.cfg.host_probe_wait / 2 };
                    self.out.push(Out::Probe { node: id.clone() });
                    self.suspects.insert(id.node.clone(), s);
                }
                self.events.push(Event::NodeDown(id));
            }
            OwnedNotification::Rename(_, new) => {
                self.table.owner_generation(&new.node, new.gen);
                self.foca.broadcast_handler_mut().revive(&new);
                if self.suspects.get(&new.node).is_some_and(|s| s.id.gen <= new.gen) {
                    self.suspects.remove(&new.node);
                }
                if self.alive.get(&new.node).is_some() {
                    self.alive.insert(new);
                }
            }
            OwnedNotification::Rejoin(new) => {
                // We were declared down and came back under a new generation: re-stamp
                // everything we own so that others take it again.
                self.stats.rejoins += 1;
                self.me = new;
                self.restamp(now);
                self.ask_views();
            }
            _ => {}
        }
        self.schedule_handovers(now);
    }

    fn emit(&mut self, changes: Vec<Change>) {
        self.events.extend(changes.into_iter().map(Event::Endpoint));
    }

    fn restamp(&mut self, now: Instant) {
        let nets: Vec<String> = self.table.joined().iter().cloned().collect();
        for net in nets {
            for mut i in self.table.owner_items(&net, &self.me.node.clone()) {
                self.clock += 1;
                i.gen = self.me.gen;
                i.version = self.clock;
                let (_, ch) = self.table.apply(i.clone(), self.ms(now));
                self.emit(ch);
                self.push_items(vec![i]);
            }
        }
        self.bump_membership();
    }

    fn my_membership(&self) -> Membership {
        self.book().memberships.get(self.me.node.as_str()).map(|h| h.membership(&self.me.node)).unwrap_or(Membership {
            owner: self.me.node.clone(),
            gen: self.me.gen,
            version: 0,
            networks: BTreeSet::new(),
        })
    }

    fn bump_membership(&mut self) {
        self.clock += 1;
        let m = Membership { owner: self.me.node.clone(), gen: self.me.gen, version: self.clock, networks: self.table.joined().clone() };
        // Kept, and passed on by foca with its next messages (a record too large is kept
        // all the same: anti-entropy carries it).
        let sent = postcard::to_allocvec(&m).ok().and_then(|data| self.foca.add_broadcast(&data).ok());
        // Ok(false): kept by the handler, too large to pass on; an error: not kept yet.
        if sent.is_none() {
            self.foca.broadcast_handler_mut().apply(&m, true, false);
        }
        self.pump(self.now);
    }

    fn book(&self) -> &Book {
        self.foca.broadcast_handler()
    }

    /// How many live peers this node knows to have joined `network`.
    pub fn network_peer_count(&self, network: &str) -> usize {
        self.alive.values().filter(|i| self.on_network(&i.node, network)).count()
    }

    /// Whether `node`'s record says it joined `network`.
    fn on_network(&self, node: &str, network: &str) -> bool {
        self.book().memberships.get(node).is_some_and(|m| m.networks.iter().any(|n| &**n == network))
    }

    /// Peers that have joined `network`, as far as we know.
    fn network_peers(&self, network: &str) -> Vec<SocketAddr> {
        self.alive.values().filter(|i| self.on_network(&i.node, network)).map(|i| i.addr).collect()
    }

    /// Queues owned items to push: what one call changes (an agent publishing a service's
    /// tasks, a restart re-stamping everything) goes out together, in as few packets as fit,
    /// when the caller takes what to send.
    fn push_items(&mut self, items: Vec<Item>) {
        self.pending.extend(items);
    }

    /// Peers that joined networks this node is on learn its own entries there at once (a
    /// membership record spreads by gossip, so a peer that joined when this node published
    /// may not have been among the peers it pushed to).
    fn greet_joiners(&mut self) {
        let joins = std::mem::take(&mut self.foca.broadcast_handler_mut().joins);
        for (owner, nets) in joins {
            let Some(addr) = self.alive.get(&owner).map(|i| i.addr) else { continue };
            let mut items = Vec::new();
            for net in nets.iter().filter(|n| self.table.joined().contains(&***n)) {
                items.extend(self.table.owner_items(net, &self.me.node));
            }
            if !items.is_empty() {
                self.send_items(items, Some(addr));
            }
        }
    }

    /// Pushes owned items to every peer on their network (or to `only`), in packets that
    /// fit.
    fn send_items(&mut self, items: Vec<Item>, only: Option<SocketAddr>) {
        // The latest change of each entry only.
        let mut seen = std::collections::HashSet::new();
        let mut by_net: BTreeMap<String, Vec<Item>> = BTreeMap::new();
        for i in items.into_iter().rev() {
            if seen.insert((i.network.clone(), i.id.clone())) {
                by_net.entry(i.network.clone()).or_default().push(i);
            }
        }
        // Sized as sent: acknowledged, with the largest sequence number, and room for the
        // list's length to grow (a varint).
        let base = postcard::to_allocvec(&Wire::ItemsAcked { seq: u64::MAX, items: Vec::new() }).map(|v| v.len() + 4 + 4).unwrap_or(usize::MAX);
        for (net, mut items) in by_net {
            items.reverse();
            let mut chunks: Vec<Vec<Item>> = vec![Vec::new()];
            let mut size = base;
            for i in items {
                let len = postcard::to_allocvec(&i).map(|v| v.len()).unwrap_or(usize::MAX);
                if size.saturating_add(len) > self.cfg.max_packet && chunks.last().is_some_and(|c| !c.is_empty()) {
                    chunks.push(Vec::new());
                    size = base;
                }
                size = size.saturating_add(len);
                if let Some(last) = chunks.last_mut() {
                    last.push(i);
                }
            }
            let peers = match only {
                Some(p) => vec![p],
                None => self.network_peers(&net),
            };
            for p in peers {
                for c in &chunks {
                    self.push_udp(p, |seq| match seq {
                        Some(seq) => Wire::ItemsAcked { seq, items: c.clone() },
                        None => Wire::Items { items: c.clone() },
                    });
                }
            }
        }
    }

    pub fn join_network(&mut self, network: &str, now: Instant) {
        self.now = self.now.max(now);
        if self.table.joined().contains(network) {
            return;
        }
        self.table.join(network);
        self.bump_membership();
        // Fetch the network's table now (from up to 3 peers), not at the next round.
        let mut peers: Vec<SocketAddr> = self.alive.values().map(|i| i.addr).collect();
        for _ in 0..3 {
            if peers.is_empty() {
                break;
            }
            let k = self.rng.random_range(0..peers.len());
            let p = peers.swap_remove(k);
            self.start_sync(p, true, true);
        }
    }

    /// Leaves a network; the caller removes its own endpoints there first.
    pub fn leave_network(&mut self, network: &str, now: Instant) {
        self.now = self.now.max(now);
        if !self.table.joined().contains(network) {
            return;
        }
        let ch = self.table.leave(network);
        self.emit(ch);
        self.bump_membership();
    }

    /// Publishes (adds or changes) one of this node's endpoints.
    pub fn set_endpoint(&mut self, ep: Endpoint, now: Instant) {
        self.now = self.now.max(now);
        if !self.table.joined().contains(&ep.network) {
            self.join_network(&ep.network.clone(), now);
        }
        self.clock += 1;
        let item = Item { owner: self.me.node.clone(), gen: self.me.gen, version: self.clock, network: ep.network.clone(), id: ep.id.clone(), value: Some(Arc::new(ep)) };
        let (_, ch) = self.table.apply(item.clone(), self.ms(now));
        self.emit(ch);
        self.push_items(vec![item]);
    }

    /// Withdraws one of this node's endpoints (a tombstone).
    pub fn remove_endpoint(&mut self, network: &str, id: &str, now: Instant) {
        self.now = self.now.max(now);
        if self.table.get(network, id).is_none_or(|i| i.value.is_none()) {
            return;
        }
        self.clock += 1;
        let item = Item { owner: self.me.node.clone(), gen: self.me.gen, version: self.clock, network: network.to_string(), id: id.to_string(), value: None };
        let (_, ch) = self.table.apply(item.clone(), self.ms(now));
        self.emit(ch);
        self.push_items(vec![item]);
    }

    /// Checksum of the live members, this node included (what `Wire::Digest` compares).
    fn members_sum(&self) -> u64 {
        self.alive.values().chain(std::iter::once(&self.me)).fold(0u64, |acc, i| acc.wrapping_add(table::fnv(i.node.as_bytes(), i.gen, 0)))
    }

    fn memberships_sum(&self) -> u64 {
        self.book().memberships.iter().fold(0u64, |acc, (owner, m)| acc.wrapping_add(table::fnv(owner.as_bytes(), m.gen, m.version)))
    }

    /// Checksums of the membership records by owner bucket, `n` buckets (a power of two).
    fn record_sums(&self, n: usize) -> Vec<u64> {
        let mut sums = vec![0u64; n];
        for (owner, m) in &self.book().memberships {
            let b = &mut sums[record_bucket(owner, n)];
            *b = b.wrapping_add(table::fnv(owner.as_bytes(), m.gen, m.version));
        }
        sums
    }

    /// The records in the given buckets (of `n`), but those `except` holds as they are.
    fn records_in(&self, want: &BTreeSet<usize>, n: usize, except: &HashMap<&str, (u64, u64)>) -> Vec<Membership> {
        self.book().memberships.iter().filter(|(o, h)| want.contains(&record_bucket(o, n)) && except.get(&***o) != Some(&(h.gen, h.version))).map(|(o, h)| h.membership(o)).collect()
    }

    /// `full`: also carry the whole SWIM view (at join time; periodic rounds do without).
    /// `buckets`: the records' checksums by bucket (a reply to a digest whose records differ).
    fn digest_of(&self, reply: bool, full: bool, buckets: bool) -> Wire {
        let nets = self.table.joined().iter().map(|n| (n.clone(), self.table.digest(n))).collect();
        let swim = if full { self.foca.iter_membership_state().cloned().collect() } else { Vec::new() };
        let buckets = if buckets { self.record_sums(record_buckets(self.book().memberships.len())) } else { Vec::new() };
        Wire::Digest {
            from: self.me.node.clone(),
            reply,
            membership: self.my_membership(),
            memberships_sum: self.memberships_sum(),
            buckets,
            nets,
            swim,
            members_sum: self.members_sum(),
            addr: self.me.addr,
        }
    }

    /// Asks members for their views again (this node started over).
    fn ask_views(&mut self) {
        self.want_view = true;
        self.view_tries = 0;
    }

    /// Starts an exchange with `to` (a digest it answers with its own) unless, and this one
    /// is not `forced` (a network join's fetch), one with `to` runs or `max_syncs` do.
    fn start_sync(&mut self, to: SocketAddr, full: bool, forced: bool) {
        let (now, timeout) = (self.now, self.cfg.sync_timeout);
        self.syncing.retain(|_, t| now.saturating_duration_since(*t) < timeout);
        if self.syncing.contains_key(&to) && !forced {
            return;
        }
        if !forced && self.syncing.len() >= self.cfg.max_syncs {
            self.stats.syncs_deferred += 1;
            return;
        }
        self.syncing.insert(to, now);
        self.send_digest_with(to, false, full, false);
    }

    /// May this reply carry the whole SWIM view (`full_replies_per_sec`)?
    fn take_full_reply(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.full_replies.1) >= Duration::from_secs(1) {
            self.full_replies = (self.cfg.full_replies_per_sec, now);
        }
        if self.full_replies.0 == 0 {
            self.stats.full_replies_withheld += 1;
            return false;
        }
        self.full_replies.0 -= 1;
        true
    }

    fn send_digest_with(&mut self, to: SocketAddr, reply: bool, full: bool, buckets: bool) {
        let d = self.digest_of(reply, full, buckets);
        self.send_stream(to, &d);
    }

    fn anti_entropy(&mut self) {
        let peers: Vec<SocketAddr> = self.alive.values().map(|i| i.addr).collect();
        if peers.is_empty() {
            return;
        }
        let p = peers[self.rng.random_range(0..peers.len())];
        self.start_sync(p, false, false);
    }

    /// Where to answer `peer`, whose stream message names `named` as its gossip address
    /// and came from `from`: a live member at the address it is known by; another only at
    /// the address it names, and only if that is on the host the message came from (a
    /// stream leaves from the sender's gossip address, on an ephemeral port). A message
    /// naming some other host would make this node send its replies there (a reflection):
    /// None, and the caller counts it as `unanswered` if a reply was due.
    fn reply_to(&self, peer: &str, named: SocketAddr, from: SocketAddr) -> Option<SocketAddr> {
        if let Some(i) = self.alive.get(peer) {
            return Some(i.addr);
        }
        (named.ip().to_canonical() == from.ip().to_canonical()).then_some(named)
    }

    fn apply_membership(&mut self, m: Membership) {
        self.foca.broadcast_handler_mut().apply(&m, false, false);
    }

    fn handle_wire(&mut self, from: SocketAddr, w: Wire, now: Instant) {
        let now_ms = self.ms(now);
        match w {
            Wire::ItemsAcked { seq, items } => {
                self.send_udp(from, &Wire::Ack { seq });
                self.handle_wire(from, Wire::Items { items }, now);
            }
            Wire::Ack { seq } => {
                if let Some(u) = self.unacked.remove(&seq) {
                    if u.to != from {
                        self.unacked.insert(seq, u);
                    } else if u.sent == 1 {
                        // Only a push sent once tells its round trip (Karn).
                        self.observe_rtt(now.saturating_duration_since(u.first));
                    }
                }
            }
            Wire::Items { items } => {
                for i in items {
                    if i.owner == self.me.node {
                        continue;
                    }
                    if self.table.joined().contains(&i.network) {
                        self.note_live_generation(&i.owner);
                    }
                    let (a, ch) = self.table.apply(i, now_ms);
                    if matches!(a, Applied::Stale) {
                        self.stats.stale += 1;
                    }
                    self.emit(ch);
                }
            }
            Wire::Digest { from: peer, reply, membership, memberships_sum, buckets, nets, swim, members_sum, addr } => {
                let to = self.reply_to(&peer, addr, from);
                if let (true, Some(to)) = (reply, to) {
                    // The exchange is over: its slot is free for the members this reply
                    // brings.
                    self.syncing.remove(&addr);
                    self.syncing.remove(&to);
                }
                // A view was sent (a join), or the views differ: answer with ours.
                let full = !swim.is_empty() || (!reply && members_sum != self.members_sum());
                if self.foca.apply_many(swim.into_iter(), false, &mut self.rt).is_err() {
                    self.stats.malformed += 1;
                }
                self.pump(now);
                // A joining node asks for views until one peer's agrees with its own; any
                // node whose view still differs from a peer's after an exchange runs its
                // next anti-entropy round sooner (SWIM's dissemination misses a few pairs
                // in a join storm; otherwise they wait a whole round).
                if reply {
                    if members_sum == self.members_sum() {
                        self.want_view = false;
                    } else {
                        self.next_ae = self.next_ae.min(now + Duration::from_secs(2));
                    }
                }
                let peer_nets = membership.networks.clone();
                self.apply_membership(membership);
                // Membership records differ somewhere: the reply carries our checksums by
                // bucket, and the peer sends its records of the buckets that differ and asks
                // for ours there (each side sending every record on every mismatch was most
                // of the real time of 5,000 simulated nodes joining).
                let differ = memberships_sum != self.memberships_sum();
                let mut ms = Vec::new();
                let mut want = Vec::new();
                let n = buckets.len();
                if differ && reply && n > 0 {
                    if n.is_power_of_two() && n <= MAX_RECORD_BUCKETS {
                        let mine = self.record_sums(n);
                        let d: BTreeSet<usize> = (0..n).filter(|&b| mine[b] != buckets[b]).collect();
                        ms = self.records_in(&d, n, &HashMap::new());
                        want = d.into_iter().filter_map(|b| u32::try_from(b).ok()).collect();
                    } else {
                        self.stats.malformed += 1;
                    }
                }
                // Owner sets the peer lacks or has older, on networks we both joined.
                let mut sets = Vec::new();
                for net in self.table.joined().iter().filter(|n| to.is_some() && peer_nets.contains(*n)) {
                    let theirs = nets.get(net).cloned().unwrap_or_default();
                    for (owner, mine) in self.table.digest(net) {
                        // Send when we differ and are not behind; if they are ahead, their
                        // reply brings theirs.
                        if theirs.get(&owner).is_none_or(|t| *t != mine && mine.stamp >= t.stamp) {
                            let items = self.table.owner_items(net, &owner);
                            sets.push(OwnerSet { network: net.clone(), owner, gen: mine.stamp.0, version: mine.stamp.1, items });
                        }
                    }
                }
                if to.is_none() && (!reply || !ms.is_empty() || !sets.is_empty() || !want.is_empty()) {
                    self.stats.unanswered += 1;
                }
                if let Some(to) = to {
                    if !ms.is_empty() || !sets.is_empty() || !want.is_empty() {
                        let buckets = u32::try_from(n).unwrap_or(0);
                        self.send_stream(to, &Wire::Sync { from: self.me.node.clone(), memberships: ms, sets, want, buckets, addr: self.me.addr });
                    }
                    if !reply {
                        let full = full && self.take_full_reply(now);
                        self.send_digest_with(to, true, full, differ);
                    }
                }
            }
            Wire::Sync { from: sender, memberships, sets, want, buckets, addr } => {
                // Asked for our records of some buckets: those the sender did not just send
                // as we hold them.
                let n = usize::try_from(buckets).unwrap_or(0);
                let answer = if want.is_empty() {
                    None
                } else if n.is_power_of_two() && n <= MAX_RECORD_BUCKETS && want.len() <= n {
                    let sent: HashMap<&str, (u64, u64)> = memberships.iter().map(|m| (m.owner.as_str(), (m.gen, m.version))).collect();
                    let want: BTreeSet<usize> = want.iter().filter_map(|&b| usize::try_from(b).ok()).collect();
                    Some(self.records_in(&want, n, &sent))
                } else {
                    self.stats.malformed += 1;
                    None
                };
                for m in memberships {
                    self.apply_membership(m);
                }
                if let Some(ms) = answer.filter(|ms| !ms.is_empty()) {
                    match self.reply_to(&sender, addr, from) {
                        Some(to) => self.send_stream(to, &Wire::Sync { from: self.me.node.clone(), memberships: ms, sets: Vec::new(), want: Vec::new(), buckets: 0, addr: self.me.addr }),
                        None => self.stats.unanswered += 1,
                    }
                }
                for s in sets {
                    if s.owner == self.me.node {
                        continue;
                    }
                    let authoritative = s.owner == sender;
                    if self.table.joined().contains(&s.network) {
                        self.note_live_generation(&s.owner);
                    }
                    let ch = self.table.apply_owner_set(s, authoritative, now_ms);
                    self.emit(ch);
                }
            }
        }
        self.schedule_handovers(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(owner: &str, gen: u64, version: u64, nets: &[&str]) -> Membership {
        Membership { owner: owner.to_string(), gen, version, networks: nets.iter().map(|n| n.to_string()).collect() }
    }

    #[test]
    fn a_dead_owners_record_in_flight_does_not_come_back() {
        let mut book = Book { me: "me".into(), ..Book::default() };
        assert!(book.apply(&record("x", 1, 5, &["a"]), false, true));
        // x (generation 1) declared down: what Gossip does on MemberDown.
        book.memberships.remove("x");
        book.gone.insert("x".into(), (1, Instant::now()));
        // A copy of its record still in flight, or an older one from anti-entropy.
        assert!(!book.apply(&record("x", 1, 5, &["a"]), false, true));
        assert!(!book.apply(&record("x", 1, 3, &["a"]), false, false));
        assert!(!book.memberships.contains_key("x"));
        assert_eq!(book.stale, 1, "only the anti-entropy copy counts as stale");
        // x restarted under a new generation: taken, and passed on.
        assert!(book.apply(&record("x", 2, 1, &["a"]), false, true));
        assert_eq!(book.memberships.get("x").map(|h| (h.gen, h.version)), Some((2, 1)));
        assert!(!book.gone.contains_key("x"));
    }

    #[test]
    fn an_older_generations_entry_after_the_newer_is_up_is_stale() {
        // The table keeps no generation for owners without entries here: the live one is
        // noted before an owner's entries are taken.
        let now = Instant::now();
        let mut g = Gossip::new(Ident::new("me", "10.209.0.1:7946".parse().expect("addr"), 1), Config::default(), 1, now);
        g.join_network("a", now);
        let x = "10.209.0.2:7946".parse().expect("addr");
        g.alive.insert(Ident::new("x", x, 2));
        let item = |gen: u64, id: &str| Item { owner: "x".into(), gen, version: 1, network: "a".into(), id: id.into(), value: Some(Arc::new(crate::table::tests::ep("a", id, 3))) };
        let items = |i: Item| frame(KIND_WIRE, &postcard::to_allocvec(&Wire::Items { items: vec![i] }).expect("encode"));
        g.handle(x, &items(item(1, "old")), false, now);
        assert!(g.table().get("a", "old").is_none(), "generation 1's entry is taken after generation 2 is up");
        assert_eq!(g.stats.stale, 1);
        g.handle(x, &items(item(2, "new")), false, now);
        assert!(g.table().get("a", "new").is_some());
    }

    #[test]
    fn a_records_head_reads_as_the_record_begins() {
        let m = record("owner-x", 7, 42, &["a", "b"]);
        let data = postcard::to_allocvec(&m).expect("encode");
        let (h, _) = postcard::take_from_bytes::<RecordHead>(&data).expect("head");
        assert_eq!((h.owner, h.gen, h.version), ("owner-x", 7, 42));
        // A copy of a record held is decided on its head; a new one is taken whole.
        let mut book = Book { me: "me".into(), ..Book::default() };
        let key = foca::BroadcastHandler::<Ident>::receive_item(&mut book, &data, Some(&Ident::new("peer", "10.209.0.9:7946".parse().expect("addr"), 1)));
        assert_eq!(key.ok().flatten(), Some(OwnerKey("owner-x".into())));
        let again = foca::BroadcastHandler::<Ident>::receive_item(&mut book, &data, Some(&Ident::new("peer", "10.209.0.9:7946".parse().expect("addr"), 1)));
        assert_eq!(again.ok().flatten(), None, "passed on once");
        // A copy whose head matches a record held but not yet passed on, with another tail:
        // refused, not relayed; the true copy still is.
        let peer = Ident::new("peer", "10.209.0.9:7946".parse().expect("addr"), 1);
        let mut book = Book { me: "me".into(), ..Book::default() };
        assert!(!book.apply(&record("owner-y", 1, 1, &["a"]), false, false), "taken from anti-entropy: not passed on yet");
        let forged = postcard::to_allocvec(&record("owner-y", 1, 1, &["z"])).expect("encode");
        let mut torn = postcard::to_allocvec(&record("owner-y", 1, 1, &["a"])).expect("encode");
        torn.truncate(torn.len() - 1);
        let mut padded = postcard::to_allocvec(&record("owner-y", 1, 1, &["a"])).expect("encode");
        padded.extend_from_slice(b"appended");
        for bad in [&forged, &torn, &padded] {
            assert!(foca::BroadcastHandler::<Ident>::receive_item(&mut book, bad, Some(&peer)).is_err(), "a head-matching copy with another tail is malformed");
        }
        let good = postcard::to_allocvec(&record("owner-y", 1, 1, &["a"])).expect("encode");
        assert_eq!(foca::BroadcastHandler::<Ident>::receive_item(&mut book, &good, Some(&peer)).ok().flatten(), Some(OwnerKey("owner-y".into())));
        assert!(foca::BroadcastHandler::<Ident>::receive_item(&mut book, &data[..3], None).is_err(), "a truncated record is malformed");
    }

    #[test]
    fn a_dead_owner_up_again_at_its_generation_is_taken_again() {
        // This node was cut off and started over: only it saw x (generation 1) go down.
        let mut book = Book { me: "me".into(), ..Book::default() };
        book.gone.insert(ident::name("x"), (1, Instant::now()));
        assert!(!book.apply(&record("x", 1, 5, &["a"]), false, false));
        // A malformed record of a newer generation does not clear the tombstone.
        let mut bad = postcard::to_allocvec(&record("x", 2, 1, &["a"])).expect("encode");
        bad.truncate(bad.len() - 1);
        let peer = Ident::new("peer", "10.209.0.9:7946".parse().expect("addr"), 1);
        assert!(foca::BroadcastHandler::<Ident>::receive_item(&mut book, &bad, Some(&peer)).is_err());
        assert!(book.gone.contains_key("x"));
        // x is up at generation 1 after all (MemberUp): its record is taken.
        book.revive(&Ident::new("x", "10.209.0.8:7946".parse().expect("addr"), 1));
        assert!(book.apply(&record("x", 1, 5, &["a"]), false, true));
        assert!(book.memberships.contains_key("x"));
    }

    #[test]
    fn local_health_slows_judgements_only_and_is_bounded() {
        let mut h = Health::default();
        let probe = Timer::ProbeRandomMember(0);
        let announce = Timer::PeriodicAnnounce(0);
        let ms = Duration::from_millis;
        assert_eq!(h.scale(ms(250), &probe), ms(250), "healthy: as foca asked");
        h.raise();
        h.raise();
        assert_eq!(h.scale(ms(250), &probe), ms(750));
        assert_eq!(h.scale(ms(250), &announce), ms(250), "only judgements of others are slowed");
        for _ in 0..20 {
            h.raise();
        }
        assert_eq!(h.multiplier(), 8, "at most 8 times, as memberlist");
        for _ in 0..20 {
            h.lower();
        }
        assert_eq!(h, Health::default());
    }

    #[test]
    fn records_of_owners_not_alive_at_two_scans_go() {
        let t0 = Instant::now();
        let mut book = Book { me: "me".into(), ..Book::default() };
        for o in ["me", "up", "late", "never"] {
            book.memberships.insert(ident::name(o), book.names.hold(&record(o, 1, 1, &["a"])));
        }
        // "late"'s record came before its owner was seen up; "never" died before this node
        // joined: neither is alive at the first scan, and neither goes yet.
        assert_eq!(book.drop_orphans(|o| o == "up", t0), 0);
        assert_eq!(book.memberships.len(), 4);
        // "late" is up by the next scan; "never" is not, and goes, tombstoned.
        assert_eq!(book.drop_orphans(|o| o == "up" || o == "late", t0), 1);
        assert!(!book.memberships.contains_key("never"));
        assert!(!book.apply(&record("never", 1, 1, &["a"]), false, false), "kept out until the given time");
        assert_eq!(book.memberships.len(), 3, "this node's own record and the live owners' stay");
        assert!(book.orphans.is_empty());
    }

    #[test]
    fn a_record_is_passed_on_once_and_a_join_is_noted_once() {
        let mut book = Book { me: "me".into(), ..Book::default() };
        // Learned by anti-entropy first: kept, not passed on, the join noted.
        assert!(!book.apply(&record("y", 1, 1, &["a"]), false, false));
        assert_eq!(book.joins.len(), 1);
        // Its broadcast then: passed on once.
        assert!(book.apply(&record("y", 1, 1, &["a"]), false, true));
        assert!(!book.apply(&record("y", 1, 1, &["a"]), false, true));
        // A newer record naming one more network: only that one is a join.
        assert!(book.apply(&record("y", 1, 2, &["a", "b"]), false, true));
        assert_eq!(book.joins.last().map(|(o, n)| (o.as_str(), n.iter().map(|s| s.to_string()).collect::<Vec<_>>())), Some(("y", vec!["b".to_string()])));
        // Nobody but this node may set its own record.
        assert!(!book.apply(&record("me", 9, 9, &["a"]), false, true));
        assert!(!book.memberships.contains_key("me"));
    }
}

#[cfg(test)]
mod exchange_tests {
    use super::*;

    fn record(owner: &str, gen: u64, version: u64) -> Membership {
        Membership { owner: owner.to_string(), gen, version, networks: ["net".to_string()].into_iter().collect() }
    }

    #[test]
    fn only_the_records_of_buckets_that_differ_are_exchanged() {
        let t0 = Instant::now();
        let (a_addr, b_addr): (SocketAddr, SocketAddr) = ("10.209.0.1:7946".parse().expect("addr"), "10.209.0.2:7946".parse().expect("addr"));
        let mut a = Gossip::new(Ident::new("bucket-a", a_addr, 1), Config::default(), 1, t0);
        let mut b = Gossip::new(Ident::new("bucket-b", b_addr, 1), Config::default(), 2, t0);
        for k in 0..400 {
            a.foca.broadcast_handler_mut().apply(&record(&format!("o{k}"), 1, 1), false, false);
            b.foca.broadcast_handler_mut().apply(&record(&format!("o{k}"), 1, 1), false, false);
        }
        // Each side has one record newer than the other's.
        a.foca.broadcast_handler_mut().apply(&record("o7", 1, 2), false, false);
        b.foca.broadcast_handler_mut().apply(&record("o300", 1, 3), false, false);
        a.take_out();
        b.take_out();
        a.start_sync(b_addr, false, false);
        let mut carried = 0;
        for _ in 0..10 {
            let mut quiet = true;
            for (from, to_node, out) in [(a_addr, 1, a.take_out()), (b_addr, 0, b.take_out())] {
                for o in out {
                    if let Out::Stream { data, .. } = o {
                        quiet = false;
                        if let Ok(Wire::Sync { memberships, .. }) = postcard::from_bytes::<Wire>(&data[4..]) {
                            carried += memberships.len();
                        }
                        let g = if to_node == 0 { &mut a } else { &mut b };
                        g.handle(from, &data, true, t0);
                    }
                }
            }
            if quiet {
                break;
            }
        }
        assert_eq!(a.memberships_sum(), b.memberships_sum(), "the records agree after one exchange");
        for g in [&a, &b] {
            assert_eq!(g.book().memberships.get("o7").map(|h| h.version), Some(2));
            assert_eq!(g.book().memberships.get("o300").map(|h| h.version), Some(3));
        }
        // 402 records in 32 buckets: at most 4 buckets differ (o7, o300, and each side's
        // own record), about 13 records each.
        assert!(carried > 0 && carried < 100, "{carried} records carried, of 402");
    }
}
