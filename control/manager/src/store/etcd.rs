//! The cluster's state in etcd (ADR 0022): a log of commits over a snapshot ([`super::log`]),
//! written only by the manager that holds the leadership, every write fenced by it.
//!
//! - **Leadership**: etcd's election API under `P/election`, on a lease of a few seconds kept
//!   alive from here. Every write is a transaction that compares the leader key's creation
//!   revision: a manager whose lease ran out (killed, cut off) cannot write once another has
//!   been elected, whatever it believes. Locally, a manager stops writing as soon as it has
//!   not heard its lease renewed for a lease's time.
//! - **A commit** is one log entry. Most fit one part, one transaction; a larger one is
//!   written part by part and counts once its last part is there (a leader that dies half way
//!   leaves an incomplete last entry, which the next leader deletes).
//! - **An unknown outcome** (etcd did not answer: no quorum, cut off) is never guessed: the
//!   entry is looked up again before the next commit, and the caller continues from the state
//!   the store really holds ([`Store::refresh`]).
//! - **Snapshots**: every `snapshot_every` entries (or `snapshot_bytes` of log) the leader
//!   writes the whole state as a snapshot and, in one transaction, points to it and deletes
//!   the log it replaces; then it compacts etcd's history to the previous snapshot.
//!
//! The `Store` trait is synchronous (the manager commits under its state's lock); the etcd
//! client is async. The store runs its own small runtime: a call hands its work to it and
//! waits (as a redb commit waits for its fsync).

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Txn, TxnOp};
use tracing::{info, warn};

use super::log::{self, Assembler, Keys, Replica, SnapPointer};
use super::{decode_objects, ClusterMeta, Store, StoreError, Write, META};
use crate::model::ClusterState;

/// TLS to etcd (`--store-ca`, `--store-cert`, `--store-key`).
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// `HOST:PORT` each.
    pub endpoints: Vec<String>,
    /// The keys' prefix (`--store-prefix`, default `/swarmnet`).
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// The leadership's lease (whole seconds; etcd's minimum is about 2 s).
    pub lease_ttl: Duration,
    /// How long one request may take.
    pub timeout: Duration,
    /// The largest part of a log entry or snapshot (etcd takes requests of up to 1.5 MiB).
    pub part_size: usize,
    /// A snapshot after this many log entries…
    pub snapshot_every: u64,
    /// …or this many bytes of log.
    pub snapshot_bytes: usize,
    /// `--import`: the embedded store of a one-manager cluster to move into etcd at start.
    pub import: Option<PathBuf>,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>, prefix: &str) -> Self {
        EtcdConfig {
            endpoints,
            prefix: prefix.to_string(),
            tls: None,
            lease_ttl: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            part_size: 512 * 1024,
            snapshot_every: 1000,
            snapshot_bytes: 8 << 20,
            import: None,
        }
    }

    /// `etcd://h1:2379,h2:2379/swarmnet`, for messages.
    pub fn shown(&self) -> String {
        format!("etcd://{}{}", self.endpoints.join(","), Keys::new(&self.prefix).prefix())
    }
}

/// The leadership this manager holds, as far as it knows.
#[derive(Clone, Debug)]
struct Lead {
    key: Vec<u8>,
    rev: i64,
    lease: i64,
}

/// The lease this manager keeps alive, and until when it surely is (the last renewal's send
/// time + its TTL).
#[derive(Clone, Copy, Debug)]
struct Renewed {
    lease: i64,
    until: Instant,
}

/// A commit whose outcome is not known.
#[derive(Debug)]
struct Unknown {
    seq: u64,
    first_part: Vec<u8>,
    parts: u32,
    writes: Vec<Write>,
}

#[derive(Debug, Default)]
struct Writer {
    replica: Replica,
    /// The cluster in `P/cluster` (None until the first commit of a new cluster).
    cluster: Option<String>,
    snap_seq: u64,
    entries_since_snap: u64,
    bytes_since_snap: usize,
    /// The etcd revision of the last snapshot's switch (what history is compacted to, one
    /// snapshot later).
    snap_rev: i64,
    unknown: Option<Unknown>,
    /// The caller's state is behind the replica's: `refresh` hands the replica over.
    behind: bool,
    /// The replica was read from the store once (by the first campaign).
    loaded: bool,
    /// The replica is not known to be the store's (before the first take-over; after the
    /// leadership was lost): read it again before writing.
    reload: bool,
}

struct Inner {
    /// A client of one member at a time (`pin`): etcd-client's balancing over several
    /// endpoints sends requests to a member that is down (etcdv3/etcd-client#39), so the
    /// store keeps to one and moves to the next when it fails or does not answer.
    client: Mutex<Client>,
    pin: Mutex<usize>,
    urls: Vec<String>,
    opts: ConnectOptions,
    keys: Keys,
    cfg: EtcdConfig,
    shown: String,
    lead: Mutex<Option<Lead>>,
    renewed: Mutex<Option<Renewed>>,
    w: tokio::sync::Mutex<Writer>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct EtcdStore {
    rt: Option<tokio::runtime::Runtime>,
    inner: Arc<Inner>,
}

fn unavailable(shown: &str, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("the store {shown}: {what}: {e}"))
}

/// Connects to the first member of `urls` that answers, from `start` on.
async fn connect_pinned(urls: &[String], opts: &ConnectOptions, start: usize, timeout: Duration) -> Result<(usize, Client), String> {
    let mut why = Vec::new();
    for k in 0..urls.len() {
        let i = (start + k) % urls.len();
        match tokio::time::timeout(timeout, Client::connect([urls[i].clone()], Some(opts.clone()))).await {
            Ok(Ok(c)) => return Ok((i, c)),
            Ok(Err(e)) => why.push(format!("{}: {e}", urls[i])),
            Err(_) => why.push(format!("{}: no answer within {timeout:?}", urls[i])),
        }
    }
    Err(why.join("; "))
}

impl Inner {
    fn err(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        let m = e.to_string();
        // etcd closes a connection whose TLS it does not accept without saying why: say what
        // to check.
        let hint = if m.contains("UnknownIssuer") {
            " (--store-ca did not sign etcd's certificate)"
        } else if !m.contains("transport") {
            ""
        } else {
            match &self.cfg.tls {
                None => " (if etcd serves its clients over TLS: --store-ca, --store-cert, --store-key)",
                Some(t) if t.cert.is_none() => " (if etcd asks its clients for a certificate: --store-cert and --store-key)",
                Some(_) => " (check --store-ca, --store-cert and --store-key against etcd's TLS)",
            }
        };
        unavailable(&self.shown, what, format!("{m}{hint}"))
    }

    fn client(&self) -> Client {
        locked(&self.client).clone()
    }

    /// Moves to the next member that answers (after a request failed or timed out on the
    /// pinned one). With one endpoint: reconnects to it.
    async fn repin(&self) {
        let from = *locked(&self.pin);
        let next = (from + 1) % self.urls.len().max(1);
        match connect_pinned(&self.urls, &self.opts, next, Duration::from_secs(2)).await {
            Ok((i, c)) => {
                if i != from {
                    info!(store = %self.shown, from = %self.urls[from], to = %self.urls[i], "moved to another etcd member");
                }
                *locked(&self.pin) = i;
                *locked(&self.client) = c;
            }
            Err(e) => warn!(store = %self.shown, error = %e, "no etcd member answers"),
        }
    }

    /// `f` within the request timeout. A failure to reach the member, or no answer, moves
    /// the store to another member for the next request.
    async fn call<T>(&self, what: &str, f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.cfg.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if !is_definite(&e) {
                    self.repin().await;
                }
                Err(self.err(what, e))
            }
            Err(_) => {
                self.repin().await;
                Err(self.err(what, format!("no answer within {:?} (etcd down, or without quorum?)", self.cfg.timeout)))
            }
        }
    }

    fn fence(&self) -> Result<Lead, StoreError> {
        let lead = locked(&self.lead).clone();
        let renewed = *locked(&self.renewed);
        match lead {
            Some(l) if renewed.is_some_and(|r| r.lease == l.lease && Instant::now() < r.until) => Ok(l),
            Some(_) => Err(StoreError::NotLeader(format!("this manager's leadership lease in {} was not renewed in time; it writes nothing until it is", self.shown))),
            None => Err(StoreError::NotLeader(format!("this manager does not hold the leadership in {}", self.shown))),
        }
    }

    fn fence_cmp(l: &Lead) -> Compare {
        Compare::create_revision(l.key.clone(), CompareOp::Equal, l.rev)
    }

    /// Every key from `from` (inclusive) to `end` (exclusive) at `rev`, in order, a page at
    /// a time.
    async fn range(&self, from: String, end: String, rev: i64, serializable: bool) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut kv = self.client().kv_client().max_decoding_message_size(64 << 20);
        let mut out = Vec::new();
        let mut start = from.into_bytes();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_revision(rev).with_limit(64);
            if serializable {
                opts = opts.with_serializable();
            }
            let r = self.call("read", kv.get(start.clone(), Some(opts))).await?;
            for x in r.kvs() {
                let k = String::from_utf8(x.key().to_vec()).map_err(|e| self.err("read", format!("a key is not UTF-8: {e}")))?;
                out.push((k, x.value().to_vec()));
            }
            match r.kvs().last() {
                Some(last) if r.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// The whole state at one revision: the replica, the snapshot it started from, the
    /// incomplete last entry if any, and the revision read.
    async fn read_all(&self) -> Result<(Replica, Option<String>, u64, Option<u64>, i64), StoreError> {
        self.read_all_with(false).await
    }

    /// [`Self::read_all_at`], again from the newest revision when the one it read at was
    /// compacted away meanwhile (a leader compacts after each snapshot: two snapshots during
    /// one long read).
    async fn read_all_with(&self, serializable: bool) -> Result<(Replica, Option<String>, u64, Option<u64>, i64), StoreError> {
        let mut tries = 0;
        loop {
            match self.read_all_at(serializable).await {
                Err(StoreError::Unavailable(m)) if m.contains("compacted") && tries < 3 => {
                    tries += 1;
                    info!(store = %self.shown, error = %m, "the revision read was compacted meanwhile: reading again");
                }
                r => return r,
            }
        }
    }

    /// `serializable`: from whichever member answers, without a quorum (possibly behind).
    async fn read_all_at(&self, serializable: bool) -> Result<(Replica, Option<String>, u64, Option<u64>, i64), StoreError> {
        let mut kv = self.client().kv_client();
        let opts = || if serializable { GetOptions::new().with_serializable() } else { GetOptions::new() };
        let first = self.call("read", kv.get(self.keys.snap(), Some(opts()))).await?;
        let rev = first.header().map(|h| h.revision()).unwrap_or(0);
        let cluster = self.call("read", kv.get(self.keys.cluster(), Some(opts().with_revision(rev)))).await?;
        let cluster = match cluster.kvs().first() {
            Some(c) => Some(String::from_utf8(c.value().to_vec()).map_err(|e| self.err("read the cluster's id", e))?),
            None => None,
        };
        let (mut replica, snap_seq) = match first.kvs().first() {
            Some(p) => {
                let ptr: SnapPointer = serde_json::from_slice(p.value()).map_err(|e| self.err("read the snapshot's pointer", e))?;
                let parts = self.range(self.keys.snap_from(ptr.seq), self.keys.snap_from(ptr.seq + 1), rev, serializable).await?;
                let mut numbered = Vec::with_capacity(parts.len());
                for (k, v) in parts {
                    numbered.push((self.keys.parse_snap(&k).map_err(|e| self.err("read the snapshot", e))?.1, v));
                }
                let bytes = log::join_snapshot(ptr, &numbered).map_err(|e| self.err("read the snapshot", e))?;
                (Replica::from_snapshot(ptr.seq, &bytes).map_err(|e| self.err("read the snapshot", e))?, ptr.seq)
            }
            None => (Replica::default(), 0),
        };
        let entries = self.range(self.keys.log_from(snap_seq + 1), format!("{}~", self.keys.log_dir()), rev, serializable).await?;
        let mut a = Assembler::new(snap_seq);
        for (k, v) in entries {
            let (seq, part) = self.keys.parse_log(&k).map_err(|e| self.err("read the log", e))?;
            if let Some(bytes) = a.push(seq, part, &v).map_err(|e| self.err("read the log", e))? {
                replica.apply(log::decode(&bytes).map_err(|e| self.err(&format!("read log entry {seq}"), e))?);
                replica.seq = seq;
            }
        }
        if cluster.is_none() && !replica.objects.is_empty() {
            return Err(self.err("read", format!("{} holds objects but no cluster id (not swarmnet's, or damaged)", self.keys.prefix())));
        }
        Ok((replica, cluster, snap_seq, a.incomplete(), rev))
    }

    /// Reads the store into the writer, removing an incomplete last entry (its writer is
    /// gone: this manager holds the leadership).
    async fn take_over(&self, w: &mut Writer) -> Result<(), StoreError> {
        let (replica, cluster, snap_seq, incomplete, rev) = self.read_all().await?;
        if let Some(seq) = incomplete {
            let l = self.fence()?;
            let del = TxnOp::delete(self.keys.log_from(seq), Some(DeleteOptions::new().with_range(self.keys.log_from(seq + 1))));
            let r = self.call("remove an incomplete entry", self.client().kv_client().txn(Txn::new().when([Self::fence_cmp(&l)]).and_then([del]))).await?;
            if !r.succeeded() {
                return Err(self.lost());
            }
            warn!(store = %self.shown, entry = seq, "removed the incomplete last log entry of a manager that stopped while writing it");
        }
        info!(store = %self.shown, entry = replica.seq, snapshot = snap_seq, objects = replica.objects.len(), "read the cluster's state");
        // The first read is what the caller starts from (it loads after the campaign); a
        // later one (the leadership lost and won again) may hold what it has not seen.
        let behind = w.loaded;
        *w = Writer { entries_since_snap: replica.seq - snap_seq, replica, cluster, snap_seq, snap_rev: rev, behind, loaded: true, ..Writer::default() };
        Ok(())
    }

    fn lost(&self) -> StoreError {
        *locked(&self.lead) = None;
        StoreError::NotLeader(format!("this manager lost the leadership in {}: another manager leads now", self.shown))
    }

    /// Settles a commit whose outcome was unknown, for good: a request still on its way
    /// can land later, so "not there" is made final by writing an empty entry (a tombstone)
    /// under its number, which the late request's compare then fails. Found whole, the
    /// commit counts (the replica takes it, and the caller must refresh); found in part, it
    /// is removed (a late part cannot land: it compares part 0's creation).
    async fn settle(&self, w: &mut Writer) -> Result<(), StoreError> {
        let Some(u) = w.unknown.take() else { return Ok(()) };
        match self.settle_one(w, &u).await {
            Ok(()) => Ok(()),
            Err(e) => {
                if !w.reload {
                    w.unknown = Some(u);
                }
                Err(e)
            }
        }
    }

    async fn settle_one(&self, w: &mut Writer, u: &Unknown) -> Result<(), StoreError> {
        let l = self.fence()?;
        let mut kv = self.client().kv_client();
        for _ in 0..3 {
            let r = self.call("look up an unsettled commit", kv.get(self.keys.log_from(u.seq), Some(GetOptions::new().with_range(self.keys.log_from(u.seq + 1))))).await?;
            let have = r.kvs().len();
            let ours = r.kvs().first().is_some_and(|k| k.value() == u.first_part.as_slice());
            if have > 0 && !ours {
                // Another writer's entry under this number: the replica is not the store's.
                w.reload = true;
                return Err(self.lost());
            }
            if have == u.parts as usize {
                info!(store = %self.shown, entry = u.seq, "a commit whose answer was lost is in the store");
                w.replica.apply(u.writes.clone());
                w.replica.seq = u.seq;
                w.entries_since_snap += 1;
                w.behind = true;
                return Ok(());
            }
            let txn = if have > 0 {
                let del = TxnOp::delete(self.keys.log_from(u.seq), Some(DeleteOptions::new().with_range(self.keys.log_from(u.seq + 1))));
                Txn::new().when([Self::fence_cmp(&l)]).and_then([del])
            } else {
                let tomb = log::split(&log::encode(&[]), self.cfg.part_size).remove(0);
                Txn::new().when([Self::fence_cmp(&l), Compare::version(self.keys.log_part(u.seq, 0), CompareOp::Equal, 0)]).and_then([TxnOp::put(self.keys.log_part(u.seq, 0), tomb, None)])
            };
            let r = self.call("settle a commit whose answer was lost", kv.txn(txn)).await?;
            if r.succeeded() {
                if have == 0 {
                    // The tombstone is entry `seq` (it changes nothing).
                    w.replica.seq = u.seq;
                    w.entries_since_snap += 1;
                }
                info!(store = %self.shown, entry = u.seq, "a commit whose answer was lost is not in the store, and cannot land any more");
                return Ok(());
            }
            if !self.call("check the leadership", kv.get(l.key.clone(), None)).await?.kvs().is_empty() {
                // Part 0 landed between the look-up and the tombstone: look again.
                continue;
            }
            w.reload = true;
            return Err(self.lost());
        }
        Err(StoreError::Unavailable(format!("the store {}: entry {} keeps changing while it is settled", self.shown, u.seq)))
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        self.fence()?;
        let mut w = self.w.lock().await;
        if w.reload {
            return Err(StoreError::Unavailable(format!("the store {}: this manager's copy of the state must be read again first", self.shown)));
        }
        self.settle(&mut w).await?;
        if w.behind {
            return Err(StoreError::Unavailable(format!("the store {} holds changes this manager has not seen: try again", self.shown)));
        }
        let l = self.fence()?;
        let bytes = log::encode(&writes);
        let parts = log::split(&bytes, self.cfg.part_size);
        let seq = w.replica.seq + 1;
        let n = u32::try_from(parts.len()).unwrap_or(u32::MAX);
        // The revision part 0 was created at: later parts compare it, so that once part 0
        // is removed (the entry settled as not there) no late part can land.
        let mut first_rev = 0;
        for (i, part) in parts.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let mut cmp = vec![Self::fence_cmp(&l)];
            let mut ops = vec![TxnOp::put(self.keys.log_part(seq, i), part.clone(), None)];
            if i > 0 {
                cmp.push(Compare::create_revision(self.keys.log_part(seq, 0), CompareOp::Equal, first_rev));
            } else {
                cmp.push(Compare::version(self.keys.log_part(seq, 0), CompareOp::Equal, 0));
                if w.cluster.is_none() {
                    // The cluster's first commit holds its metadata: its id claims the prefix.
                    let id = cluster_id_of(&writes).ok_or_else(|| StoreError::Unavailable(format!("the store {}: the first commit of a cluster must hold its metadata", self.shown)))?;
                    cmp.push(Compare::create_revision(self.keys.cluster(), CompareOp::Equal, 0));
                    ops.push(TxnOp::put(self.keys.cluster(), id, None));
                }
            }
            let txn = Txn::new().when(cmp).and_then(ops);
            match tokio::time::timeout(self.cfg.timeout, self.client().kv_client().txn(txn)).await {
                Ok(Ok(r)) if r.succeeded() => {
                    if i == 0 {
                        first_rev = r.header().map(|h| h.revision()).unwrap_or(0);
                    }
                }
                Ok(Ok(_)) => return Err(self.refused(&mut w, seq).await),
                Ok(Err(e)) if i == 0 && is_definite(&e) => return Err(self.err("commit", e)),
                outcome => {
                    let why = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {:?} (etcd down, or without quorum?)", self.cfg.timeout),
                    };
                    w.unknown = Some(Unknown { seq, first_part: parts[0].clone(), parts: n, writes });
                    self.repin().await;
                    return Err(StoreError::Unavailable(format!("the store {}: commit of entry {seq}: {why}; the cluster takes no change until it answers", self.shown)));
                }
            }
        }
        if w.cluster.is_none() {
            w.cluster = cluster_id_of(&writes);
        }
        w.replica.apply(writes);
        w.replica.seq = seq;
        w.entries_since_snap += 1;
        w.bytes_since_snap += bytes.len();
        if w.entries_since_snap >= self.cfg.snapshot_every || w.bytes_since_snap >= self.cfg.snapshot_bytes {
            // The commit stands whatever happens to the snapshot; the next commit tries again.
            if let Err(e) = self.snapshot(&mut w).await {
                warn!(store = %self.shown, error = %e, "could not write a snapshot (the log goes on growing until one is written)");
            }
        }
        Ok(())
    }

    /// Why a fenced transaction was refused: the leadership is gone, or another writer's
    /// entry took the number (the replica is not the store's).
    async fn refused(&self, w: &mut Writer, seq: u64) -> StoreError {
        let leader_key = locked(&self.lead).as_ref().map(|l| l.key.clone());
        let held = match leader_key {
            Some(k) => self.call("check the leadership", self.client().kv_client().get(k, None)).await.map(|r| !r.kvs().is_empty()),
            None => Ok(false),
        };
        match held {
            Ok(false) => {
                w.reload = true;
                self.lost()
            }
            Ok(true) => {
                w.reload = true;
                StoreError::Unavailable(format!("the store {}: entry {seq} was written by another manager; reading the state again", self.shown))
            }
            Err(e) => e,
        }
    }

    async fn snapshot(&self, w: &mut Writer) -> Result<(), StoreError> {
        let l = self.fence()?;
        let seq = w.replica.seq;
        let parts = log::split(&w.replica.snapshot(), self.cfg.part_size);
        let n = u32::try_from(parts.len()).unwrap_or(u32::MAX);
        let mut kv = self.client().kv_client();
        for (i, p) in parts.into_iter().enumerate() {
            let put = TxnOp::put(self.keys.snap_part(seq, u32::try_from(i).unwrap_or(u32::MAX)), p, None);
            let r = self.call("write a snapshot", kv.txn(Txn::new().when([Self::fence_cmp(&l)]).and_then([put]))).await?;
            if !r.succeeded() {
                return Err(self.lost());
            }
        }
        let ptr = serde_json::to_vec(&SnapPointer { seq, parts: n })?;
        let ops = [
            TxnOp::put(self.keys.snap(), ptr, None),
            TxnOp::delete(self.keys.log_dir(), Some(DeleteOptions::new().with_range(self.keys.log_from(seq + 1)))),
            TxnOp::delete(self.keys.snap_dir(), Some(DeleteOptions::new().with_range(self.keys.snap_from(seq)))),
        ];
        let r = self.call("switch to a snapshot", kv.txn(Txn::new().when([Self::fence_cmp(&l)]).and_then(ops))).await?;
        if !r.succeeded() {
            return Err(self.lost());
        }
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        // History up to the previous snapshot is no longer needed by anyone reading the
        // store (a reader that was that far behind reads it all again).
        if w.snap_rev > 0 {
            if let Err(e) = self.call("compact etcd's history", kv.compact(w.snap_rev, None)).await {
                warn!(store = %self.shown, revision = w.snap_rev, error = %e, "could not compact etcd's history");
            }
        }
        info!(store = %self.shown, entry = seq, parts = n, "wrote a snapshot");
        w.snap_seq = seq;
        w.snap_rev = rev;
        w.entries_since_snap = 0;
        w.bytes_since_snap = 0;
        Ok(())
    }

    /// Keeps `lease` alive from its grant on (also while a campaign waits for an earlier
    /// leader to go), and marks the leadership lost when etcd says the lease is gone. While
    /// etcd does not answer, the lease lapses locally (writes stop) and comes back if it is
    /// renewed before it expired in etcd. Ends when another lease replaces this one.
    async fn keep_alive(self: Arc<Self>, lease: i64) {
        let ttl = self.cfg.lease_ttl;
        let every = (ttl / 3).max(Duration::from_millis(200));
        let current = || locked(&self.renewed).is_some_and(|r| r.lease == lease);
        while current() {
            let mut lease_client = self.client().lease_client();
            let (mut keeper, mut stream) = match self.call("keep the lease alive", lease_client.keep_alive(lease)).await {
                Ok(k) => k,
                Err(e) => {
                    warn!(store = %self.shown, error = %e, "cannot renew the leadership's lease; trying again");
                    tokio::time::sleep(every / 2).await;
                    continue;
                }
            };
            while current() {
                let sent = Instant::now();
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(every, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        let mut renewed = locked(&self.renewed);
                        if renewed.is_some_and(|r| r.lease == lease) {
                            *renewed = Some(Renewed { lease, until: sent + Duration::from_secs(r.ttl().unsigned_abs()).min(ttl) });
                        }
                    }
                    Ok(Ok(Some(_))) => {
                        warn!(store = %self.shown, "the leadership's lease expired in etcd: this manager no longer leads");
                        let mut lead = locked(&self.lead);
                        if lead.as_ref().is_some_and(|l| l.lease == lease) {
                            *lead = None;
                        }
                        return;
                    }
                    Ok(Ok(None)) | Ok(Err(_)) => break,
                    Err(_) => {}
                }
                tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
            }
            tokio::time::sleep(every / 2).await;
        }
    }
}

/// A refusal that says nothing was written (the request never got to be applied).
fn is_definite(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            use tonic::Code;
            matches!(s.code(), Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated | Code::FailedPrecondition | Code::OutOfRange | Code::ResourceExhausted)
        }
        etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => true,
        _ => false,
    }
}

fn cluster_id_of(writes: &[Write]) -> Option<String> {
    writes.iter().find_map(|w| match w {
        Write::Put { table, key, value } if *table == META && key == "cluster" => serde_json::from_slice::<ClusterMeta>(value).ok().map(|m| m.cluster_id),
        _ => None,
    })
}

impl EtcdStore {
    /// Connects and reads the store's cluster id (to check that etcd answers and that the
    /// prefix is a swarmnet cluster's or empty).
    pub fn connect(cfg: EtcdConfig) -> Result<EtcdStore, StoreError> {
        let shown = cfg.shown();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("etcd-store").enable_all().build().map_err(|e| unavailable(&shown, "start its worker", e))?;
        // HTTP/2 pings every 10 s: etcd closes a connection that pings more often than its
        // --grpc-keepalive-min-time (5 s) with "too many pings" (a campaign then breaks).
        let mut opts = ConnectOptions::new().with_connect_timeout(cfg.timeout).with_keep_alive(Duration::from_secs(10), cfg.timeout);
        let scheme = if let Some(t) = &cfg.tls {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &t.ca {
                let pem = std::fs::read(ca).map_err(|e| unavailable(&shown, &format!("read --store-ca {}", ca.display()), e))?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            match (&t.cert, &t.key) {
                (Some(c), Some(k)) => {
                    let cert = std::fs::read(c).map_err(|e| unavailable(&shown, &format!("read --store-cert {}", c.display()), e))?;
                    let key = std::fs::read(k).map_err(|e| unavailable(&shown, &format!("read --store-key {}", k.display()), e))?;
                    tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => return Err(StoreError::Unavailable(format!("the store {shown}: --store-cert and --store-key go together"))),
            }
            opts = opts.with_tls(tls);
            "https"
        } else {
            "http"
        };
        let urls: Vec<String> = cfg.endpoints.iter().map(|e| format!("{scheme}://{e}")).collect();
        let keys = Keys::new(&cfg.prefix);
        let timeout = cfg.timeout;
        // Connected on the store's own runtime (its channel's tasks live there), waited for on
        // this thread: the caller may itself be inside a runtime, where block_on is refused.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (u, o) = (urls.clone(), opts.clone());
        rt.spawn(async move {
            let _ = tx.send(connect_pinned(&u, &o, 0, timeout).await);
        });
        let (pin, client) = rx.recv().map_err(|_| unavailable(&shown, "connect", "its worker stopped"))?.map_err(|e| unavailable(&shown, "connect", e))?;
        let inner = Arc::new(Inner {
            client: Mutex::new(client),
            pin: Mutex::new(pin),
            urls,
            opts,
            keys,
            cfg,
            shown,
            lead: Mutex::new(None),
            renewed: Mutex::new(None),
            w: tokio::sync::Mutex::new(Writer { reload: true, ..Writer::default() }),
        });
        let store = EtcdStore { rt: Some(rt), inner };
        // etcd answers, and the prefix is ours or empty.
        store.cluster_id()?;
        Ok(store)
    }

    fn run<T: Send + 'static>(&self, f: impl Future<Output = Result<T, StoreError>> + Send + 'static) -> Result<T, StoreError> {
        let Some(rt) = self.rt.as_ref() else { return Err(StoreError::Unavailable(format!("the store {}: closed", self.inner.shown))) };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().map_err(|_| StoreError::Unavailable(format!("the store {}: its worker stopped", self.inner.shown)))?
    }

    /// The cluster this store holds, if any. A prefix with keys but no cluster id is not
    /// swarmnet's: refused.
    pub fn cluster_id(&self) -> Result<Option<String>, StoreError> {
        let inner = self.inner.clone();
        self.run(async move {
            let mut kv = inner.client().kv_client();
            let r = inner.call("read the cluster's id", kv.get(inner.keys.cluster(), None)).await?;
            if let Some(c) = r.kvs().first() {
                return String::from_utf8(c.value().to_vec()).map(Some).map_err(|e| inner.err("read the cluster's id", e));
            }
            let any = inner.call("read", kv.get(inner.keys.all(), Some(GetOptions::new().with_prefix().with_keys_only().with_limit(20)))).await?;
            let foreign: Vec<String> = any.kvs().iter().map(|k| String::from_utf8_lossy(k.key()).into_owned()).filter(|k| !k.starts_with(&inner.keys.election())).collect();
            if let Some(k) = foreign.first() {
                return Err(StoreError::Backend {
                    path: inner.shown.clone(),
                    msg: format!("the prefix holds keys that are not a swarmnet cluster's (for example {k}): choose another --store-prefix"),
                });
            }
            Ok(None)
        })
    }

    /// Like `run`, awaited: the caller's runtime is not blocked (a campaign may wait long).
    async fn run_async<T: Send + 'static>(&self, f: impl Future<Output = Result<T, StoreError>> + Send + 'static) -> Result<T, StoreError> {
        let Some(rt) = self.rt.as_ref() else { return Err(StoreError::Unavailable(format!("the store {}: closed", self.inner.shown))) };
        let (tx, rx) = tokio::sync::oneshot::channel();
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.await.map_err(|_| StoreError::Unavailable(format!("the store {}: its worker stopped", self.inner.shown)))?
    }

    /// The state as whichever etcd member answers holds it, without a quorum: what a manager
    /// that stands by shows when no manager leads (marked stale).
    pub fn load_stale(&self) -> Result<(Option<ClusterMeta>, ClusterState), StoreError> {
        let inner = self.inner.clone();
        // Each failure moves to another member: one that is up answers.
        let replica = self.run(async move {
            let mut last = None;
            for _ in 0..inner.urls.len().max(1) {
                match inner.read_all_with(true).await {
                    Ok(r) => return Ok(r.0),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| inner.err("read", "no member")))
        })?;
        decode_objects(replica.iter())
    }

    /// Whether etcd answers a read that needs its quorum (within 2 s).
    pub fn has_quorum(&self) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        self.run(async move {
            let mut kv = inner.client().kv_client();
            let r = match tokio::time::timeout(Duration::from_secs(2), kv.get(inner.keys.cluster(), None)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => Err(inner.err("read with its quorum", e)),
                Err(_) => Err(StoreError::Unavailable(format!("the store {}: no answer to a read that needs its quorum within 2 s", inner.shown))),
            };
            inner.repin().await;
            r
        })
    }

    /// The value of the manager that leads now (`hostname addr:port`), if one does.
    pub fn leader(&self) -> Result<Option<String>, StoreError> {
        let inner = self.inner.clone();
        self.run(async move {
            let mut election = inner.client().election_client();
            match election.leader(inner.keys.election()).await {
                Ok(r) => Ok(r.kv().map(|k| String::from_utf8_lossy(k.value()).into_owned())),
                // etcd answers "election: no leader" as an error.
                Err(e) if e.to_string().contains("no leader") => Ok(None),
                Err(e) => Err(inner.err("find the leader", e)),
            }
        })
    }

    /// Becomes the leader (waits up to `wait` for a leader that is there to go), then reads
    /// the state. `value` says who leads (`node ls`, and where writes are forwarded).
    pub fn campaign(&self, value: &str, wait: Duration) -> Result<(), StoreError> {
        let f = self.campaign_work(value, wait);
        self.run(f)
    }

    /// [`EtcdStore::campaign`], awaited without blocking the caller's runtime.
    pub async fn campaign_async(&self, value: &str, wait: Duration) -> Result<(), StoreError> {
        let f = self.campaign_work(value, wait);
        self.run_async(f).await
    }

    fn campaign_work(&self, value: &str, wait: Duration) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let inner = self.inner.clone();
        let value = value.to_string();
        async move {
            let ttl = i64::try_from(inner.cfg.lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX);
            let granted = Instant::now();
            let lease = inner.call("grant a lease", inner.client().lease_client().grant(ttl, None)).await?.id();
            *locked(&inner.lead) = None;
            *locked(&inner.renewed) = Some(Renewed { lease, until: granted + Duration::from_secs(ttl.unsigned_abs()) });
            // Kept alive from now on, also while the campaign waits.
            tokio::spawn(inner.clone().keep_alive(lease));
            let mut election = inner.client().election_client();
            let won = tokio::time::timeout(wait, election.campaign(inner.keys.election(), value.clone(), lease)).await;
            let give_up = |inner: Arc<Inner>| async move {
                *locked(&inner.renewed) = None;
                let _ = inner.call("give the lease up", inner.client().lease_client().revoke(lease)).await;
            };
            let leader = match won {
                Ok(Ok(r)) => r.leader().cloned(),
                Ok(Err(e)) => {
                    give_up(inner.clone()).await;
                    return Err(inner.err("campaign for the leadership", e));
                }
                Err(_) => {
                    give_up(inner.clone()).await;
                    let who = election.leader(inner.keys.election()).await.ok().and_then(|r| r.kv().map(|k| String::from_utf8_lossy(k.value()).into_owned()));
                    return Err(StoreError::NotLeader(format!(
                        "another manager ({}) leads the cluster in {} and did not step down within {wait:?}",
                        who.unwrap_or_else(|| "unknown".into()),
                        inner.shown
                    )));
                }
            };
            let Some(leader) = leader else { return Err(inner.err("campaign for the leadership", "no leader key in the answer")) };
            *locked(&inner.lead) = Some(Lead { key: leader.key().to_vec(), rev: leader.rev(), lease });
            info!(store = %inner.shown, key = %String::from_utf8_lossy(leader.key()), "this manager leads the cluster");
            let mut w = inner.w.lock().await;
            inner.take_over(&mut w).await
        }
    }

    /// Gives the leadership up (the next manager need not wait for the lease to run out).
    pub fn resign(&self) {
        let inner = self.inner.clone();
        let lead = locked(&inner.lead).take();
        *locked(&inner.renewed) = None;
        if let Some(l) = lead {
            let _ = self.run(async move {
                let _ = inner.call("give the leadership up", inner.client().lease_client().revoke(l.lease)).await;
                Ok(())
            });
        }
    }

    /// Whether this manager holds the leadership now (as far as it knows).
    pub fn is_leader(&self) -> bool {
        self.inner.fence().is_ok()
    }
}

impl Store for EtcdStore {
    fn load(&self) -> Result<(Option<ClusterMeta>, ClusterState), StoreError> {
        let inner = self.inner.clone();
        let replica = self.run(async move { inner.read_all().await.map(|r| r.0) })?;
        decode_objects(replica.iter())
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        let writes = writes.to_vec();
        self.run(async move { inner.commit(writes).await })
    }

    fn refresh(&self) -> Result<Option<(Option<ClusterMeta>, ClusterState)>, StoreError> {
        let inner = self.inner.clone();
        let replica = self.run(async move {
            let mut w = inner.w.lock().await;
            if w.reload {
                inner.fence()?;
                inner.take_over(&mut w).await?;
            }
            inner.settle(&mut w).await?;
            if !w.behind {
                return Ok(None);
            }
            w.behind = false;
            Ok(Some(w.replica.clone()))
        })?;
        replica.map(|r| decode_objects(r.iter())).transpose()
    }

    fn describe(&self) -> String {
        self.inner.shown.clone()
    }

    fn leads(&self) -> bool {
        self.is_leader()
    }

    fn resign(&self) {
        EtcdStore::resign(self)
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // A runtime cannot be dropped where blocking is not allowed (inside another one).
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
