//! Sealed gossip (issue 11): every UDP packet and every stream message on 7946 is
//! AES-256-GCM with a key only the manager hands out (over the mutual-TLS session, to the
//! nodes it admitted). A message that does not open with one of the keys a node holds is
//! dropped before anything parses it.
//!
//! Layout: `S E 1` (magic, version) · key id (u32, big endian) · send time (ms since the
//! epoch, u64) · nonce (12 random bytes) · ciphertext · tag (16). The first 15 bytes are
//! the additional data: the key id and the time cannot be changed without the tag failing.
//! A message sent more than [`MAX_AGE_MS`] away from the receiver's clock is refused, and
//! [`ReplayGuard`] refuses a message whose nonce it has seen: a captured packet sent again,
//! later or at once, from any address, changes nothing.
//!
//! A stream message (TCP) goes as a run of chunks, each sealed on its own and sent as a frame
//! of its own (issue 19): a receiver opens a chunk before it reads the next, so a peer that
//! has not proven it holds the key (its first chunk opened) makes a node hold one small
//! first chunk at most ([`MAX_FIRST_FRAME`]), never the message it announces. A chunk's
//! plaintext: stream id (8 random bytes) · sequence number (u32, from 0) · flags (bit 0: the
//! last) · in the first chunk only, the message's whole length (u32) · data. The id and the
//! sequence number tie every chunk to its message: none can be moved, dropped or replayed
//! into another without the reader refusing the stream ([`StreamReader`]).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

pub const MAGIC: [u8; 3] = *b"SE\x01";
const HEADER: usize = 3 + 4 + 8;
/// Bytes a sealed message adds to its plaintext.
pub const OVERHEAD: usize = HEADER + NONCE_LEN + 16;
/// How far a message's send time may be from the receiver's clock.
pub const MAX_AGE_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not a sealed gossip message")]
    NotSealed,
    #[error("sealed with key {0}, which this node does not hold")]
    UnknownKey(u32),
    #[error("does not authenticate")]
    Forged,
    #[error("sent {0} ms away from this node's clock (replayed, or clocks apart)")]
    Stale(u64),
}

/// The keys a node accepts (newest first) and the one it seals with.
pub struct Keyring {
    keys: Vec<(u32, LessSafeKey)>,
    /// Index into `keys` of the one that seals.
    send: usize,
    rng: SystemRandom,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("ids", &self.ids()).field("send", &self.send_id()).finish()
    }
}

impl Keyring {
    /// `keys`: (id, 32 key bytes); the highest id is the one messages are sealed with.
    pub fn new(keys: &[(u32, [u8; 32])]) -> Result<Keyring, String> {
        Self::with_send(keys, 0)
    }

    /// `keys`, sealing with key `send` (0, or an id not among them: the highest).
    pub fn with_send(keys: &[(u32, [u8; 32])], send: u32) -> Result<Keyring, String> {
        if keys.is_empty() {
            return Err("a gossip keyring needs at least one key".into());
        }
        let mut v = Vec::new();
        for (id, k) in keys {
            let unbound = UnboundKey::new(&AES_256_GCM, k).map_err(|_| format!("gossip key {id}: not an AES-256 key"))?;
            v.push((*id, LessSafeKey::new(unbound)));
        }
        v.sort_by_key(|k| std::cmp::Reverse(k.0));
        v.dedup_by(|a, b| a.0 == b.0);
        let send = v.iter().position(|(id, _)| *id == send).unwrap_or(0);
        Ok(Keyring { keys: v, send, rng: SystemRandom::new() })
    }

    /// The id of the key that seals.
    pub fn send_id(&self) -> u32 {
        self.keys.get(self.send).map_or(0, |k| k.0)
    }

    /// Key ids, newest first.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|(id, _)| *id).collect()
    }

    /// Seals `plain` with the newest key, stamped `now_ms`.
    pub fn seal(&self, plain: &[u8], now_ms: u64) -> Result<Vec<u8>, String> {
        let (id, key) = self.keys.get(self.send).ok_or("no gossip key")?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| "no randomness for a gossip nonce")?;
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&out[..HEADER]), &mut body).map_err(|_| "gossip seal failed")?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a sealed message: its plaintext, or why it is refused.
    pub fn open(&self, data: &[u8], now_ms: u64) -> Result<Vec<u8>, OpenError> {
        if data.len() < OVERHEAD || data[..3] != MAGIC {
            return Err(OpenError::NotSealed);
        }
        let id = u32::from_be_bytes([data[3], data[4], data[5], data[6]]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&data[7..HEADER]);
        let sent = u64::from_be_bytes(ts);
        let key = self.keys.iter().find(|(k, _)| *k == id).map(|(_, k)| k).ok_or(OpenError::UnknownKey(id))?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&data[HEADER..HEADER + NONCE_LEN]);
        let mut body = data[HEADER + NONCE_LEN..].to_vec();
        let plain = key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&data[..HEADER]), &mut body).map_err(|_| OpenError::Forged)?;
        let plain = plain.to_vec();
        // The time is checked only once it is known to be the sender's.
        let apart = sent.abs_diff(now_ms);
        if apart > MAX_AGE_MS {
            return Err(OpenError::Stale(apart));
        }
        Ok(plain)
    }
}

/// Refuses a sealed message seen before: the nonces of the messages opened (and sealed) in
/// the last 2 × [`MAX_AGE_MS`] (older ones are refused by their send time anyway). With the time window
/// this makes a replay change nothing, also within the minute.
#[derive(Default)]
pub struct ReplayGuard {
    seen: std::collections::HashSet<[u8; NONCE_LEN]>,
    order: std::collections::VecDeque<(u64, [u8; NONCE_LEN])>,
}

impl ReplayGuard {
    /// True if `data` (a message that opened) is new; remembers it. `now_ms`: this node's
    /// clock, which also ages out what it remembers.
    pub fn fresh(&mut self, data: &[u8], now_ms: u64) -> bool {
        while self.order.front().is_some_and(|(t, _)| now_ms.saturating_sub(*t) > 2 * MAX_AGE_MS) {
            if let Some((_, n)) = self.order.pop_front() {
                self.seen.remove(&n);
            }
        }
        let Some(n) = data.get(HEADER..HEADER + NONCE_LEN) else { return false };
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(n);
        if !self.seen.insert(nonce) {
            return false;
        }
        self.order.push_back((now_ms, nonce));
        true
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Data bytes in a stream message's first chunk, and in each later one.
pub const FIRST_CHUNK_DATA: usize = 1024;
pub const CHUNK_DATA: usize = 32 << 10;
const CHUNK_HEADER: usize = 8 + 4 + 1;
const FLAG_LAST: u8 = 1;
/// The largest first frame of a stream message (sealed), and the largest later one.
pub const MAX_FIRST_FRAME: usize = OVERHEAD + CHUNK_HEADER + 4 + FIRST_CHUNK_DATA;
pub const MAX_FRAME: usize = OVERHEAD + CHUNK_HEADER + CHUNK_DATA;

/// The plaintext chunks of stream message `plain` under stream id `id` (each to be sealed,
/// or sent as it is when gossip runs unsealed).
pub fn chunks(id: [u8; 8], plain: &[u8]) -> Vec<Vec<u8>> {
    let total = u32::try_from(plain.len()).unwrap_or(u32::MAX);
    let (first, rest) = plain.split_at(plain.len().min(FIRST_CHUNK_DATA));
    let mut parts: Vec<&[u8]> = vec![first];
    parts.extend(rest.chunks(CHUNK_DATA));
    let n = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(seq, data)| {
            let mut c = Vec::with_capacity(CHUNK_HEADER + 4 + data.len());
            c.extend_from_slice(&id);
            c.extend_from_slice(&u32::try_from(seq).unwrap_or(u32::MAX).to_be_bytes());
            c.push(if seq + 1 == n { FLAG_LAST } else { 0 });
            if seq == 0 {
                c.extend_from_slice(&total.to_be_bytes());
            }
            c.extend_from_slice(data);
            c
        })
        .collect()
}

/// A random stream id.
pub fn stream_id() -> Result<[u8; 8], String> {
    let mut id = [0u8; 8];
    SystemRandom::new().fill(&mut id).map_err(|_| "no randomness for a gossip stream id")?;
    Ok(id)
}

/// Why a stream was refused (the connection is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("chunk too short")]
    Short,
    #[error("a chunk of another stream, or out of order")]
    OutOfOrder,
    #[error("a message of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("the chunks carry more or less than the message's length")]
    Length,
}

/// What a chunk did to the message being read.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The first chunk: the message will be this long (the reader may now set memory aside
    /// for it: the sender proved it holds the key).
    Started(usize),
    /// A later chunk, not the last.
    More,
    /// The last chunk: the whole message.
    Done(Vec<u8>),
}

/// Reassembles stream messages from their opened chunks, in order; refuses anything else.
#[derive(Default)]
pub struct StreamReader {
    cur: Option<Current>,
}

struct Current {
    id: [u8; 8],
    next: u32,
    total: usize,
    buf: Vec<u8>,
}

impl StreamReader {
    /// The largest frame the next chunk may come in (sealed).
    pub fn max_frame(&self) -> usize {
        if self.cur.is_some() {
            MAX_FRAME
        } else {
            MAX_FIRST_FRAME
        }
    }

    /// True if the next chunk starts a message.
    pub fn expects_first(&self) -> bool {
        self.cur.is_none()
    }

    /// Takes one opened chunk; `max`: the largest message accepted.
    pub fn take(&mut self, chunk: &[u8], max: usize) -> Result<Step, StreamError> {
        if chunk.len() < CHUNK_HEADER {
            return Err(StreamError::Short);
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&chunk[..8]);
        let seq = u32::from_be_bytes([chunk[8], chunk[9], chunk[10], chunk[11]]);
        let last = chunk[12] & FLAG_LAST != 0;
        let mut data = &chunk[CHUNK_HEADER..];
        let first = match &mut self.cur {
            None if seq == 0 => {
                let Some((len, rest)) = data.split_first_chunk::<4>() else { return Err(StreamError::Short) };
                let total = u32::from_be_bytes(*len) as usize;
                if total > max {
                    return Err(StreamError::TooLarge(total));
                }
                data = rest;
                // Grows as chunks arrive: what the first chunk announces is not allocated.
                self.cur = Some(Current { id, next: 1, total, buf: Vec::with_capacity(data.len()) });
                true
            }
            Some(c) if c.id == id && c.next == seq => {
                c.next += 1;
                false
            }
            _ => return Err(StreamError::OutOfOrder),
        };
        let Some(c) = self.cur.as_mut() else { return Err(StreamError::OutOfOrder) };
        if c.buf.len() + data.len() > c.total {
            return Err(StreamError::Length);
        }
        c.buf.extend_from_slice(data);
        if last {
            let done = self.cur.take().map(|c| (c.total, c.buf));
            return match done {
                Some((total, buf)) if buf.len() == total => Ok(Step::Done(buf)),
                _ => Err(StreamError::Length),
            };
        }
        if first {
            return Ok(Step::Started(c.total));
        }
        Ok(Step::More)
    }
}

/// A new random key.
pub fn new_key() -> Result<[u8; 32], String> {
    let mut k = [0u8; 32];
    SystemRandom::new().fill(&mut k).map_err(|_| "no randomness for a gossip key")?;
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn sealed_messages_open_with_the_key_and_only_with_it() {
        let k1 = new_key().expect("key");
        let k2 = new_key().expect("key");
        let a = Keyring::new(&[(1, k1)]).expect("ring");
        let sealed = a.seal(b"endpoint 10.0.0.3", NOW).expect("seal");
        assert_eq!(sealed.len(), 17 + OVERHEAD);
        assert!(!sealed.windows(8).any(|w| w == b"10.0.0.3"), "nothing in clear");
        assert_eq!(a.open(&sealed, NOW + 5).expect("open"), b"endpoint 10.0.0.3");
        // Another cluster's key, or one this node does not hold.
        let b = Keyring::new(&[(1, k2)]).expect("ring");
        assert_eq!(b.open(&sealed, NOW), Err(OpenError::Forged));
        let c = Keyring::new(&[(2, k2)]).expect("ring");
        assert_eq!(c.open(&sealed, NOW), Err(OpenError::UnknownKey(1)));
        // Any flipped bit, in the header or the body, and plaintext.
        for i in [0, 4, 10, 20, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(a.open(&bad, NOW).is_err(), "byte {i}");
        }
        assert_eq!(a.open(b"SN\x02\x02plain", NOW), Err(OpenError::NotSealed));
        assert_eq!(a.open(b"", NOW), Err(OpenError::NotSealed));
    }

    #[test]
    fn old_and_new_keys_open_the_newest_seals_and_old_messages_are_refused() {
        let (k1, k2) = (new_key().expect("key"), new_key().expect("key"));
        let old = Keyring::new(&[(1, k1)]).expect("ring");
        let both = Keyring::new(&[(1, k1), (2, k2)]).expect("ring");
        assert_eq!(both.ids(), vec![2, 1]);
        let from_old = old.seal(b"x", NOW).expect("seal");
        assert_eq!(both.open(&from_old, NOW).expect("previous key still accepted"), b"x");
        let from_new = both.seal(b"y", NOW).expect("seal");
        assert_eq!(from_new[3..7], 2u32.to_be_bytes(), "sealed with the newest");
        assert_eq!(old.open(&from_new, NOW), Err(OpenError::UnknownKey(2)));
        assert_eq!(both.open(&from_new, NOW + MAX_AGE_MS + 1), Err(OpenError::Stale(MAX_AGE_MS + 1)));
        assert!(Keyring::new(&[]).is_err());
        // Handed out first to be accepted only: still sealing with the old one.
        let staged = Keyring::with_send(&[(1, k1), (2, k2)], 1).expect("ring");
        assert_eq!(staged.send_id(), 1);
        assert_eq!(old.open(&staged.seal(b"z", NOW).expect("seal"), NOW).expect("old nodes read it"), b"z");
    }

    #[test]
    fn stream_messages_go_in_chunks_that_reassemble_only_in_order() {
        let big: Vec<u8> = (0..(FIRST_CHUNK_DATA + 2 * CHUNK_DATA + 5)).map(|i| i as u8).collect();
        let id = stream_id().expect("id");
        let cs = chunks(id, &big);
        assert_eq!(cs.len(), 4, "a first chunk of 1 KiB, then 32 KiB chunks");
        let k = Keyring::new(&[(1, new_key().expect("key"))]).expect("ring");
        let sealed: Vec<Vec<u8>> = cs.iter().map(|c| k.seal(c, NOW).expect("seal")).collect();
        assert!(sealed[0].len() <= MAX_FIRST_FRAME && sealed.iter().all(|f| f.len() <= MAX_FRAME), "every frame within its limit");
        let mut r = StreamReader::default();
        assert_eq!(r.max_frame(), MAX_FIRST_FRAME);
        let mut steps = Vec::new();
        for f in &sealed {
            steps.push(r.take(&k.open(f, NOW).expect("open"), 16 << 20).expect("take"));
        }
        assert_eq!(steps[0], Step::Started(big.len()));
        assert_eq!(steps[1], Step::More);
        assert_eq!(steps[3], Step::Done(big.clone()));
        assert!(r.expects_first(), "ready for the next message");
        // Small messages are one chunk; an empty one too.
        for m in [&b"x"[..], &b""[..]] {
            let cs = chunks(id, m);
            assert_eq!(cs.len(), 1);
            assert_eq!(StreamReader::default().take(&cs[0], 100), Ok(Step::Done(m.to_vec())));
        }
        // Out of order, from another stream, a later chunk first, a chunk dropped, too much.
        let mut r = StreamReader::default();
        assert_eq!(r.take(&cs_of(&big, id)[1], 1 << 24), Err(StreamError::OutOfOrder), "a later chunk first");
        let mut r2 = StreamReader::default();
        r2.take(&cs_of(&big, id)[0], 1 << 24).expect("first");
        assert_eq!(r2.take(&cs_of(&big, [9; 8])[1], 1 << 24), Err(StreamError::OutOfOrder), "another stream's chunk");
        let mut r3 = StreamReader::default();
        r3.take(&cs_of(&big, id)[0], 1 << 24).expect("first");
        assert_eq!(r3.take(&cs_of(&big, id)[2], 1 << 24), Err(StreamError::OutOfOrder), "a chunk dropped");
        assert_eq!(r.take(&cs_of(&big, id)[0], 100), Err(StreamError::TooLarge(big.len())), "over the limit, refused at the first chunk");
        let mut lying = cs_of(b"abc", id)[0].clone();
        lying[13..17].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(StreamReader::default().take(&lying, 100), Err(StreamError::Length), "more data than announced");
        assert_eq!(StreamReader::default().take(b"short", 100), Err(StreamError::Short));
    }

    fn cs_of(m: &[u8], id: [u8; 8]) -> Vec<Vec<u8>> {
        chunks(id, m)
    }

    #[test]
    fn a_replayed_message_is_refused_and_memory_ages_out() {
        let k = Keyring::new(&[(1, new_key().expect("key"))]).expect("ring");
        let mut g = ReplayGuard::default();
        let a = k.seal(b"a", NOW).expect("seal");
        let b = k.seal(b"b", NOW).expect("seal");
        assert!(g.fresh(&a, NOW));
        assert!(g.fresh(&b, NOW + 1));
        assert!(!g.fresh(&a, NOW + 2), "the same message again");
        assert_eq!(g.len(), 2);
        let c = k.seal(b"c", NOW + 3 * MAX_AGE_MS).expect("seal");
        assert!(g.fresh(&c, NOW + 3 * MAX_AGE_MS));
        assert_eq!(g.len(), 1, "what is older than the window is forgotten");
        assert!(!g.fresh(b"short", NOW));
    }
}
