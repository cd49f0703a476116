//! The layout of the cluster's state in a key-value store that takes small transactions
//! (etcd: at most 128 operations and about 1.5 MiB a request), pure: no I/O.
//!
//! The state is a log of commits over a snapshot (ADR 0022). A commit is one entry: its
//! writes encoded as one byte string, cut into parts that each fit a request. An entry counts
//! once all its parts are there; only the last entry can be incomplete (a leader that died
//! while writing it), and the next leader removes it. A snapshot is the same encoding of
//! every object as a put, in parts; a pointer names the snapshot and the log entries it
//! replaces are deleted with the pointer's change, in one transaction.
//!
//! Keys, under the store's prefix `P`:
//! - `P/cluster`: the cluster's id (written with the cluster's first commit);
//! - `P/election/…`: the managers' campaign keys (etcd's election API);
//! - `P/log/<seq>/<part>`: a part of entry `seq` (16 and 8 hex digits: keys sort as numbers);
//! - `P/snap`: the snapshot's pointer `{"seq":…,"parts":…}`;
//! - `P/snapdata/<seq>/<part>`: the snapshot's parts.
//!
//! A part's value: the entry's number of parts (u32, big endian), then its slice of the entry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Write, TABLES};

/// Format of the encoded writes (first byte of an entry and of a snapshot).
const FORMAT: u8 = 1;
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("entry {seq}: {msg}")]
    Entry { seq: u64, msg: String },
    #[error("the log jumps from entry {last} to {next}")]
    Gap { last: u64, next: u64 },
    #[error("entry {seq} is incomplete ({have} of {parts} parts) but entry {next} follows it")]
    IncompleteInside { seq: u64, have: u32, parts: u32, next: u64 },
    #[error("key {0} is not one of the store's")]
    Key(String),
    #[error("snapshot: {0}")]
    Snapshot(String),
}

fn table_index(t: &str) -> Option<u8> {
    TABLES.iter().position(|x| *x == t).and_then(|i| u8::try_from(i).ok())
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Keys and objects are far below 4 GiB; a longer one is cut rather than wrapped.
    let n = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(&b[..n as usize]);
}

/// The writes of one commit as one byte string.
pub fn encode(writes: &[Write]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + writes.iter().map(|w| 10 + w.key().len() + w.value().map_or(0, |v| v.len() + 4)).sum::<usize>());
    out.push(FORMAT);
    out.extend_from_slice(&u32::try_from(writes.len()).unwrap_or(u32::MAX).to_be_bytes());
    for w in writes {
        let (op, table, key, value) = match w {
            Write::Put { table, key, value } => (OP_PUT, *table, key, Some(value)),
            Write::Delete { table, key } => (OP_DELETE, *table, key, None),
        };
        out.push(op);
        // Tables are the fixed set of `TABLES`; `Write`s are only made with those.
        out.push(table_index(table).unwrap_or(u8::MAX));
        put_bytes(&mut out, key.as_bytes());
        if let Some(v) = value {
            put_bytes(&mut out, v);
        }
    }
    out
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err(format!("cut short: {n} bytes wanted, {} left", self.b.len()));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// The writes an [`encode`]d byte string holds.
pub fn decode(b: &[u8]) -> Result<Vec<Write>, String> {
    let mut r = Reader { b };
    let f = r.u8()?;
    if f != FORMAT {
        return Err(format!("format {f} is not {FORMAT} (written by another version?)"));
    }
    let n = r.u32()?;
    let mut out = Vec::with_capacity((n as usize).min(b.len() / 10));
    for i in 0..n {
        let op = r.u8()?;
        let t = r.u8()?;
        let table = *TABLES.get(t as usize).ok_or_else(|| format!("write {i}: table {t} is unknown"))?;
        let key = std::str::from_utf8(r.bytes()?).map_err(|e| format!("write {i}: key: {e}"))?.to_string();
        out.push(match op {
            OP_PUT => Write::Put { table, key, value: r.bytes()?.to_vec() },
            OP_DELETE => Write::Delete { table, key },
            _ => return Err(format!("write {i}: operation {op} is unknown")),
        });
    }
    if !r.b.is_empty() {
        return Err(format!("{} bytes after the last write", r.b.len()));
    }
    Ok(out)
}

/// `bytes` cut into parts of at most `size` bytes of data, each with its header.
pub fn split(bytes: &[u8], size: usize) -> Vec<Vec<u8>> {
    let size = size.max(1);
    let chunks: Vec<&[u8]> = if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(size).collect() };
    let n = u32::try_from(chunks.len()).unwrap_or(u32::MAX).to_be_bytes();
    chunks
        .into_iter()
        .map(|c| {
            let mut v = Vec::with_capacity(4 + c.len());
            v.extend_from_slice(&n);
            v.extend_from_slice(c);
            v
        })
        .collect()
}

fn part_header(value: &[u8]) -> Option<(u32, &[u8])> {
    let (h, rest) = value.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*h), rest))
}

/// The store's keys under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` without its trailing slashes (`/swarmnet`).
    pub fn new(prefix: &str) -> Self {
        Keys { prefix: prefix.trim_end_matches('/').to_string() }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// Everything of the store: `P/`.
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }
    pub fn cluster(&self) -> String {
        format!("{}/cluster", self.prefix)
    }
    pub fn election(&self) -> String {
        format!("{}/election", self.prefix)
    }
    pub fn log_dir(&self) -> String {
        format!("{}/log/", self.prefix)
    }
    /// The first key of entry `seq`: a range from it holds `seq` and every later entry.
    pub fn log_from(&self, seq: u64) -> String {
        format!("{}/log/{seq:016x}/", self.prefix)
    }
    pub fn log_part(&self, seq: u64, part: u32) -> String {
        format!("{}/log/{seq:016x}/{part:08x}", self.prefix)
    }
    pub fn snap(&self) -> String {
        format!("{}/snap", self.prefix)
    }
    pub fn snap_dir(&self) -> String {
        format!("{}/snapdata/", self.prefix)
    }
    pub fn snap_from(&self, seq: u64) -> String {
        format!("{}/snapdata/{seq:016x}/", self.prefix)
    }
    pub fn snap_part(&self, seq: u64, part: u32) -> String {
        format!("{}/snapdata/{seq:016x}/{part:08x}", self.prefix)
    }
    /// (seq, part) of a log key.
    pub fn parse_log(&self, key: &str) -> Result<(u64, u32), LogError> {
        parse_seq_part(key.strip_prefix(&self.log_dir()).ok_or_else(|| LogError::Key(key.into()))?).ok_or_else(|| LogError::Key(key.into()))
    }
    /// (seq, part) of a snapshot part's key.
    pub fn parse_snap(&self, key: &str) -> Result<(u64, u32), LogError> {
        parse_seq_part(key.strip_prefix(&self.snap_dir()).ok_or_else(|| LogError::Key(key.into()))?).ok_or_else(|| LogError::Key(key.into()))
    }
}

fn parse_seq_part(rest: &str) -> Option<(u64, u32)> {
    let (s, p) = rest.split_once('/')?;
    if s.len() != 16 || p.len() != 8 {
        return None;
    }
    Some((u64::from_str_radix(s, 16).ok()?, u32::from_str_radix(p, 16).ok()?))
}

/// The snapshot's pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapPointer {
    /// The last entry the snapshot holds.
    pub seq: u64,
    pub parts: u32,
}

/// Joins an entry's parts, given in key order (part 0 first).
#[derive(Debug)]
struct Pending {
    seq: u64,
    parts: u32,
    have: u32,
    bytes: Vec<u8>,
}

/// Reads the log in key order: entries after `after`, consecutive, each whole once its
/// last part has come.
#[derive(Debug)]
pub struct Assembler {
    /// The last whole entry.
    pub last: u64,
    pending: Option<Pending>,
}

impl Assembler {
    pub fn new(after: u64) -> Self {
        Assembler { last: after, pending: None }
    }

    /// Takes one part. Returns the entry's bytes once it is whole.
    pub fn push(&mut self, seq: u64, part: u32, value: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        if seq <= self.last {
            // Replaced by the snapshot (deleted with its pointer, but a reader can see both).
            return Ok(None);
        }
        let (parts, data) = part_header(value).ok_or(LogError::Entry { seq, msg: format!("part {part} has no header") })?;
        if parts == 0 {
            return Err(LogError::Entry { seq, msg: "0 parts".into() });
        }
        match &mut self.pending {
            Some(p) if p.seq == seq => {
                if part != p.have || parts != p.parts {
                    return Err(LogError::Entry { seq, msg: format!("part {part} of {parts} after {} of {}", p.have, p.parts) });
                }
            }
            Some(p) => return Err(LogError::IncompleteInside { seq: p.seq, have: p.have, parts: p.parts, next: seq }),
            None => {
                if seq != self.last + 1 {
                    return Err(LogError::Gap { last: self.last, next: seq });
                }
                if part != 0 {
                    return Err(LogError::Entry { seq, msg: format!("starts with part {part}") });
                }
                self.pending = Some(Pending { seq, parts, have: 0, bytes: Vec::new() });
            }
        }
        let Some(p) = self.pending.as_mut() else { return Ok(None) };
        p.bytes.extend_from_slice(data);
        p.have += 1;
        if p.have < p.parts {
            return Ok(None);
        }
        let done = self.pending.take().map(|p| p.bytes);
        self.last = seq;
        Ok(done)
    }

    /// The entry still waiting for parts, if any.
    pub fn incomplete(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.seq)
    }

    /// A part of the incomplete entry was deleted (its writer died; the next leader removed
    /// it): start that entry afresh.
    pub fn forget(&mut self, seq: u64) {
        if self.pending.as_ref().is_some_and(|p| p.seq == seq) {
            self.pending = None;
        }
    }
}

/// Every object of the cluster as the store holds it (table, key → the object's JSON), and
/// the last entry applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replica {
    pub seq: u64,
    pub objects: BTreeMap<(&'static str, String), Vec<u8>>,
}

impl Replica {
    pub fn apply(&mut self, writes: Vec<Write>) {
        for w in writes {
            match w {
                Write::Put { table, key, value } => {
                    self.objects.insert((table, key), value);
                }
                Write::Delete { table, key } => {
                    self.objects.remove(&(table, key));
                }
            }
        }
    }

    /// The snapshot's bytes: every object as a put.
    pub fn snapshot(&self) -> Vec<u8> {
        let all: Vec<Write> = self.objects.iter().map(|((t, k), v)| Write::Put { table: t, key: k.clone(), value: v.clone() }).collect();
        encode(&all)
    }

    pub fn from_snapshot(seq: u64, bytes: &[u8]) -> Result<Self, LogError> {
        let mut r = Replica { seq, objects: BTreeMap::new() };
        let writes = decode(bytes).map_err(LogError::Snapshot)?;
        if writes.iter().any(|w| matches!(w, Write::Delete { .. })) {
            return Err(LogError::Snapshot("holds a delete".into()));
        }
        r.apply(writes);
        Ok(r)
    }

    /// The objects as (table, key, JSON).
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str, &[u8])> {
        self.objects.iter().map(|((t, k), v)| (*t, k.as_str(), v.as_slice()))
    }

    pub fn bytes(&self) -> usize {
        self.objects.iter().map(|((_, k), v)| k.len() + v.len()).sum()
    }
}

/// Joins a snapshot's parts (in key order) into its bytes.
pub fn join_snapshot(ptr: SnapPointer, parts: &[(u32, Vec<u8>)]) -> Result<Vec<u8>, LogError> {
    if parts.len() != ptr.parts as usize {
        return Err(LogError::Snapshot(format!("{} of its {} parts are there", parts.len(), ptr.parts)));
    }
    let mut out = Vec::new();
    for (i, (n, v)) in parts.iter().enumerate() {
        let (total, data) = part_header(v).ok_or_else(|| LogError::Snapshot(format!("part {n} has no header")))?;
        if *n as usize != i || total != ptr.parts {
            return Err(LogError::Snapshot(format!("part {n} (of {total}) where part {i} of {} belongs", ptr.parts)));
        }
        out.extend_from_slice(data);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{META, NODES, TASKS};

    fn put(t: &'static str, k: &str, v: &str) -> Write {
        Write::Put { table: t, key: k.into(), value: v.as_bytes().to_vec() }
    }

    #[test]
    fn writes_survive_encoding_and_bad_bytes_are_refused() {
        let w = vec![put(NODES, "a", r#"{"x":1}"#), Write::Delete { table: TASKS, key: "t1".into() }, put(META, "cluster", "{}"), put(TASKS, "", "")];
        let b = encode(&w);
        assert_eq!(decode(&b).expect("decode"), w);
        assert_eq!(decode(&encode(&[])).expect("empty"), vec![]);
        for cut in 0..b.len() {
            assert!(decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = b.clone();
        extra.push(0);
        assert!(decode(&extra).expect_err("trailing").contains("after the last write"));
        let mut other = b.clone();
        other[0] = 9;
        assert!(decode(&other).expect_err("format").contains("format 9"));
        let mut bad_table = encode(&[put(NODES, "a", "1")]);
        bad_table[6] = 77;
        assert!(decode(&bad_table).expect_err("table").contains("table 77"));
    }

    #[test]
    fn parts_join_back_and_only_the_last_entry_may_be_incomplete() {
        let k = Keys::new("/swarmnet/");
        assert_eq!(k.log_part(10, 2), "/swarmnet/log/000000000000000a/00000002");
        assert_eq!(k.parse_log(&k.log_part(10, 2)), Ok((10, 2)));
        assert!(k.parse_log("/swarmnet/log/zz/00000002").is_err());
        assert!(k.parse_log("/other/log/000000000000000a/00000002").is_err());
        assert!(k.log_from(10) < k.log_part(10, 0) && k.log_part(10, u32::MAX) < k.log_from(11));
        assert_eq!(k.parse_snap(&k.snap_part(3, 1)), Ok((3, 1)));

        let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let parts = split(&big, 4096);
        assert_eq!(parts.len(), 3);
        let mut a = Assembler::new(4);
        assert_eq!(a.push(3, 0, &split(b"old", 10)[0]), Ok(None), "before the snapshot: skipped");
        assert_eq!(a.push(5, 0, &split(b"five", 10)[0]), Ok(Some(b"five".to_vec())));
        assert_eq!(a.push(6, 0, &parts[0]), Ok(None));
        assert_eq!(a.push(6, 1, &parts[1]), Ok(None));
        assert_eq!(a.incomplete(), Some(6));
        assert_eq!(a.push(6, 2, &parts[2]), Ok(Some(big.clone())));
        assert_eq!((a.last, a.incomplete()), (6, None));
        // A dead writer's incomplete entry, removed, then written again by the next leader.
        assert_eq!(a.push(7, 0, &parts[0]), Ok(None));
        a.forget(7);
        assert_eq!(a.push(7, 0, &split(b"seven", 10)[0]), Ok(Some(b"seven".to_vec())));
        // Faults: a gap, an entry that starts with a later part, an incomplete one inside.
        assert_eq!(Assembler::new(0).push(2, 0, &parts[0]), Err(LogError::Gap { last: 0, next: 2 }));
        assert!(matches!(Assembler::new(0).push(1, 1, &parts[1]), Err(LogError::Entry { seq: 1, .. })));
        let mut a = Assembler::new(0);
        assert_eq!(a.push(1, 0, &parts[0]), Ok(None));
        assert_eq!(a.push(2, 0, &parts[0]), Err(LogError::IncompleteInside { seq: 1, have: 1, parts: 3, next: 2 }));
        assert!(matches!(Assembler::new(0).push(1, 0, &[0, 0]), Err(LogError::Entry { .. })));
        assert!(matches!(Assembler::new(0).push(1, 0, &[0, 0, 0, 0]), Err(LogError::Entry { .. })), "0 parts");
        assert_eq!(split(&[], 10).len(), 1, "an empty entry is one part");
    }

    #[test]
    fn a_replica_snapshots_and_comes_back_from_its_parts() {
        let mut r = Replica::default();
        r.apply(vec![put(NODES, "a", "1"), put(NODES, "b", "2"), put(TASKS, "t", "3")]);
        r.apply(vec![Write::Delete { table: NODES, key: "b".into() }, put(TASKS, "t", "4")]);
        r.seq = 9;
        let snap = r.snapshot();
        let parts: Vec<(u32, Vec<u8>)> = split(&snap, 7).into_iter().enumerate().map(|(i, p)| (i as u32, p)).collect();
        let ptr = SnapPointer { seq: 9, parts: parts.len() as u32 };
        let back = Replica::from_snapshot(9, &join_snapshot(ptr, &parts).expect("join")).expect("snapshot");
        assert_eq!(back, r);
        assert_eq!(back.iter().map(|(t, k, _)| format!("{t}/{k}")).collect::<Vec<_>>(), vec!["nodes/a", "tasks/t"]);
        assert!(join_snapshot(SnapPointer { seq: 9, parts: ptr.parts + 1 }, &parts).is_err(), "a part missing");
        let mut swapped = parts.clone();
        swapped.swap(0, 1);
        assert!(join_snapshot(ptr, &swapped).is_err(), "parts out of order");
        assert!(Replica::from_snapshot(1, &encode(&[Write::Delete { table: NODES, key: "a".into() }])).is_err());
    }
}
