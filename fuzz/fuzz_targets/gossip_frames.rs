//! Port 7946: the sealed envelope (`seal::Keyring::open`, the replay guard), then the
//! plaintext that comes out of it (`Gossip::handle`: SWIM via foca, the endpoint tables via
//! postcard), over UDP and over the stream, and the stream's chunks (`seal::StreamReader`).
//! The first byte picks the path.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use swarmnet_gossip::seal::{self, Keyring, ReplayGuard, Step, StreamReader};
use swarmnet_gossip::{Config, Gossip, Ident};

/// A fixed clock for the sealed envelope's send-time check.
const NOW_MS: u64 = 1_800_000_000_000;

fn node() -> Gossip {
    let me = Ident::new("fuzz-node", "10.210.0.1:7946".parse().expect("addr"), 1);
    let now = Instant::now();
    let mut g = Gossip::new(me, Config::default(), 7, now);
    // The seeds' network: their table items are applied, not skipped as unknown.
    g.join_network("fuzznet", now);
    g
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let ring = Keyring::new(&[(1, [7u8; 32]), (2, [9u8; 32])]).expect("keyring");
    let from = "10.210.0.2:7946".parse().expect("addr");
    let mut g = node();
    let now = Instant::now();
    match mode % 6 {
        0 => {
            // Anything can arrive: it opens (then goes on) or is refused, never more.
            if let Ok(plain) = ring.open(rest, NOW_MS) {
                let mut guard = ReplayGuard::default();
                if guard.fresh(rest, NOW_MS) {
                    g.handle(from, &plain, false, now);
                }
                assert!(!guard.fresh(rest, NOW_MS), "a replay was taken as new");
            }
        }
        1 => g.handle(from, rest, false, now),
        2 => g.handle(from, rest, true, now),
        3 => {
            // What is sealed opens to itself; one flipped bit is refused.
            let sealed = ring.seal(rest, NOW_MS).expect("seal");
            assert_eq!(ring.open(&sealed, NOW_MS).expect("open"), rest);
            let mut bad = sealed.clone();
            let i = rest.len() % bad.len();
            bad[i] ^= 1;
            assert!(ring.open(&bad, NOW_MS).is_err(), "a tampered message opened");
            g.handle(from, rest, true, now);
        }
        4 => {
            // Opened chunks of a stream as anyone could make them (`[u16 length][chunk]`...):
            // reassembled in order or refused; a message that comes out goes on.
            let mut r = StreamReader::default();
            let mut data = rest;
            while let Some((len, tail)) = data.split_first_chunk::<2>() {
                let n = usize::from(u16::from_be_bytes(*len)).min(tail.len());
                let (chunk, next) = tail.split_at(n);
                data = next;
                match r.take(chunk, swarmnet_gossip::MAX_STREAM_MESSAGE) {
                    Ok(Step::Done(m)) => g.handle(from, &m, true, now),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        _ => {
            // A message in sealed chunks comes back whole, in order, and only so.
            let chunks = seal::chunks([3; 8], rest);
            let mut r = StreamReader::default();
            let mut out = None;
            for c in &chunks {
                let sealed = ring.seal(c, NOW_MS).expect("seal");
                assert!(sealed.len() <= seal::MAX_FRAME);
                let opened = ring.open(&sealed, NOW_MS).expect("open");
                if let Step::Done(m) = r.take(&opened, usize::MAX).expect("in order") {
                    out = Some(m);
                }
            }
            assert_eq!(out.as_deref(), Some(rest), "reassembled");
            if chunks.len() > 1 {
                assert!(StreamReader::default().take(&chunks[1], usize::MAX).is_err(), "a later chunk first is refused");
            }
        }
    }
    // Whatever was taken in, the node's next steps must not fail either.
    g.tick(now + Duration::from_secs(11));
    let _ = g.take_out();
    let _ = g.take_events();
});
