//! `cargo xtask fuzz …`: the libFuzzer targets in `fuzz/` (issue 11). `seeds` writes the
//! seed inputs (real messages of each decoder, made with the project's own types) into
//! `fuzz/seeds/<target>/`; `run` runs cargo-fuzz on the seeds and the kept corpus
//! (`fuzz/corpus/<target>/`), new finds going to a scratch directory.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use swarmnet_gossip::seal::Keyring;
use swarmnet_gossip::{Config, Gossip, Ident, Out};
use swarmnet_types::{Endpoint, EndpointState};

pub const TARGETS: &[&str] = &["gossip_frames", "api_frames", "dns_udp"];

/// The fuzz target's fixed clock and keys (fuzz/fuzz_targets/gossip_frames.rs).
const NOW_MS: u64 = 1_800_000_000_000;

fn fuzz_dir() -> Result<PathBuf> {
    Ok(std::env::current_dir()?.join("fuzz"))
}

/// Runs `targets` for `runs` inputs each (or `seconds`, whichever ends first); fails on a
/// crash, a hang (10 s per input) or more than 1 GiB of memory.
/// `keep`: new finds go into the kept corpus, minimised afterwards (`cargo fuzz cmin`).
pub fn run(targets: &[String], runs: u64, seconds: u64, keep: bool) -> Result<()> {
    let dir = fuzz_dir()?;
    let nightly = Command::new("rustup").args(["run", "nightly", "cargo", "fuzz", "--version"]).output();
    if !nightly.is_ok_and(|o| o.status.success()) {
        bail!("cargo-fuzz is not installed for the nightly toolchain (bash .ci/setup installs it)");
    }
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("unknown fuzz target {t:?} (known: {})", TARGETS.join(", "));
        }
        let scratch = std::env::temp_dir().join(format!("swarmnet-fuzz-{t}-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        let corpus = dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let started = Instant::now();
        println!("fuzz {t}: {runs} inputs (at most {seconds} s)");
        let st = Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", "--sanitizer", "none", t])
            .args(if keep { [&corpus, &scratch] } else { [&scratch, &corpus] })
            .arg(dir.join("seeds").join(t))
            .args(["--", &format!("-runs={runs}"), &format!("-max_total_time={seconds}"), "-rss_limit_mb=1024", "-malloc_limit_mb=1024", "-timeout=10", "-max_len=65536", "-print_final_stats=1"])
            .current_dir(&dir)
            .env("CARGO_BUILD_JOBS", "2")
            .status()?;
        let _ = std::fs::remove_dir_all(&scratch);
        if !st.success() {
            bail!("fuzz target {t} failed (the input that did it is under fuzz/artifacts/{t}/)");
        }
        println!("fuzz {t}: no crash, hang or runaway memory in {:.0} s", started.elapsed().as_secs_f64());
        if keep {
            let st = Command::new("rustup").args(["run", "nightly", "cargo", "fuzz", "cmin", "--sanitizer", "none", t]).arg(&corpus).current_dir(&dir).status()?;
            if !st.success() {
                bail!("minimising the corpus of {t} failed");
            }
        }
    }
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes).with_context(|| format!("writing {}", dir.join(name).display()))
}

fn with_mode(mode: u8, b: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(b);
    v
}

/// Writes the seed inputs of every target.
pub fn seeds() -> Result<()> {
    let dir = fuzz_dir()?.join("seeds");
    gossip_seeds(&dir.join("gossip_frames"))?;
    api_seeds(&dir.join("api_frames"))?;
    dns_seeds(&dir.join("dns_udp"))?;
    println!("seeds written under {}", dir.display());
    Ok(())
}

/// Real gossip traffic: two nodes meeting, one publishing endpoints, every packet kept as
/// UDP (mode 1) or stream (mode 2), some of them sealed (mode 0) and as plaintext to seal
/// (mode 3).
fn gossip_seeds(dir: &Path) -> Result<()> {
    let a: SocketAddr = "10.210.0.1:7946".parse()?;
    let b: SocketAddr = "10.210.0.2:7946".parse()?;
    let t0 = Instant::now();
    let mut ga = Gossip::new(Ident::new("node-a", a, 1), Config::default(), 1, t0);
    let mut gb = Gossip::new(Ident::new("node-b", b, 1), Config::default(), 2, t0);
    for g in [&mut ga, &mut gb] {
        g.join_network("fuzznet", t0);
    }
    for i in 1..=3u8 {
        let ip = Ipv4Addr::new(10, 0, 9, i);
        ga.set_endpoint(
            Endpoint {
                network: "fuzznet".into(),
                id: format!("task{i}"),
                task_name: format!("web.{i}"),
                service_name: "web".into(),
                service_id: "web-id".into(),
                aliases: vec!["www".into()],
                ip,
                mac: [2, 0x42, 10, 0, 9, i],
                vtep: IpAddr::V4(Ipv4Addr::new(10, 210, 0, 1)),
                vip: Some(Ipv4Addr::new(10, 0, 9, 250)),
                ports: vec![],
                state: EndpointState::Active,
            },
            t0,
        );
    }
    ga.join_via(&[b], t0);
    let mut packets: Vec<(bool, Vec<u8>)> = Vec::new();
    let mut now = t0;
    for _ in 0..40 {
        now += Duration::from_millis(150);
        for turn in 0..2 {
            let (from, g, other) = if turn == 0 { (a, &mut ga, &mut gb) } else { (b, &mut gb, &mut ga) };
            g.tick(now);
            for o in g.take_out() {
                let (stream, data) = match o {
                    Out::Udp { data, .. } => (false, data),
                    Out::Stream { data, .. } => (true, data),
                    Out::Probe { .. } => continue,
                };
                other.handle(from, &data, stream, now);
                packets.push((stream, data));
            }
        }
    }
    packets.sort();
    packets.dedup();
    let ring = Keyring::new(&[(1, [7u8; 32])]).map_err(anyhow::Error::msg)?;
    for (i, (stream, data)) in packets.iter().take(64).enumerate() {
        write(dir, &format!("packet-{i:02}"), &with_mode(if *stream { 2 } else { 1 }, data))?;
        if i % 8 == 0 {
            write(dir, &format!("sealed-{i:02}"), &with_mode(0, &ring.seal(data, NOW_MS).map_err(anyhow::Error::msg)?))?;
            write(dir, &format!("to-seal-{i:02}"), &with_mode(3, data))?;
        }
        if *stream {
            // The stream's chunks as opened (`[u16 length][chunk]`...), and the message to
            // send in chunks.
            let mut chunks = Vec::new();
            for c in swarmnet_gossip::seal::chunks([i as u8; 8], data) {
                chunks.extend_from_slice(&u16::try_from(c.len()).unwrap_or(u16::MAX).to_be_bytes());
                chunks.extend_from_slice(&c);
            }
            write(dir, &format!("chunks-{i:02}"), &with_mode(4, &chunks))?;
            write(dir, &format!("to-chunk-{i:02}"), &with_mode(5, data))?;
        }
    }
    if packets.is_empty() {
        bail!("the two gossip nodes exchanged nothing");
    }
    Ok(())
}

fn frame(json: &str) -> Vec<u8> {
    let mut v = u32::try_from(json.len()).unwrap_or(0).to_be_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v
}

/// One input per message kind of each side of 2377 and the control socket, framed as on
/// the wire; the first byte is the target's mode (the type read).
fn api_seeds(dir: &Path) -> Result<()> {
    let key = "07".repeat(32);
    let node = r#"{"id":"n1","hostname":"h1","address":"10.210.0.1","status":"ready","availability":"active","manager_status":"Leader","role":"manager","gossip_key":{"held":[1,2],"current":2}}"#;
    let seeds: Vec<(u8, Vec<&str>)> = vec![
        (0, vec![r#"{"type":"join","secret":"s","hostname":"h2","addr":"10.210.0.2","underlay":["10.210.0.0/24"]}"#]),
        (0, vec![r#"{"type":"session","reports":[{"task_id":"t1","state":"running","error":"","pid":42,"restarts":0}],"hostname":"h2"}"#]),
        (
            0,
            vec![
                r#"{"type":"api","request":{"verb":"service_create","spec":{"name":"web","mode":"replicated","replicas":3,"command":["sleep","1"],"networks":[{"name":"appnet","aliases":["v1"]}],"endpoint_mode":"vip","publish":[{"published":8080,"target":80,"protocol":"tcp","mode":"ingress"}]}}}"#,
            ],
        ),
        (
            0,
            vec![
                r#"{"type":"api","request":{"verb":"service_update","name":"web","publish_add":[{"published":null,"target":80,"protocol":"udp","mode":"host"}],"publish_rm":[{"published":8080,"protocol":null}]}}"#,
            ],
        ),
        (
            1,
            vec![
                r#"{"type":"heartbeat"}"#,
                r#"{"type":"reports","reports":[{"task_id":"t1","state":"failed","error":"exit 1","pid":null,"restarts":2}]}"#,
                r#"{"type":"gossip_keys_held","ids":[1,2]}"#,
            ],
        ),
        (
            2,
            vec![
                r#"{"type":"assign","full":true,"upsert":[{"task_id":"t1","name":"web.1","service_id":"s1","service_name":"web","ports":[],"command":["sleep","1"],"restart":true,"attachments":[]}],"remove":["t0"]}"#,
            ],
        ),
        (2, vec![r#"{"type":"nodes","nodes":[["n1","10.210.0.1"],["n2","10.210.0.2"]]}"#, r#"{"type":"vips","vips":[{"network":"net1","vip":"10.0.1.2","service":"web"}]}"#]),
        (2, vec![r#"{"type":"ingress","ingress":null}"#]),
        (4, vec![r#"{"node_id":"n2","heartbeat_ms":5000,"data_path_port":4789}"#]),
        (5, vec![r#"{"ok":false,"error":{"kind":"not_found","message":"network x not found"},"data":null}"#]),
        (0, vec![r#"{"type":"api","request":{"verb":"join_token","role":"worker"}}"#, r#"{"type":"api","request":{"verb":"service_scale","name":"web","replicas":0}}"#]),
    ];
    let keys = format!(r#"{{"type":"gossip_keys","keys":[{{"id":1,"key":"{key}"}},{{"id":2,"key":"{key}"}}],"send":2}}"#);
    let nodes = format!(r#"{{"ok":true,"data":[{node}]}}"#);
    let mut all: Vec<(u8, Vec<u8>)> = seeds.into_iter().map(|(m, js)| (m, js.iter().flat_map(|j| frame(j)).collect())).collect();
    all.push((2, frame(&keys)));
    all.push((7, frame(&nodes)));
    for (i, (mode, bytes)) in all.iter().enumerate() {
        write(dir, &format!("frames-{i:02}"), &with_mode(*mode, bytes))?;
    }
    Ok(())
}

/// A DNS query as a stub resolver sends it.
fn dns_query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        v.push(label.len() as u8);
        v.extend_from_slice(label.as_bytes());
    }
    v.push(0);
    v.extend_from_slice(&qtype.to_be_bytes());
    v.extend_from_slice(&[0, 1]);
    if let Some(size) = edns {
        v.extend_from_slice(&[0, 0, 41]);
        v.extend_from_slice(&size.to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    v
}

fn dns_seeds(dir: &Path) -> Result<()> {
    let qs: &[(&str, u16, Option<u16>)] = &[
        ("web", 1, None),
        ("tasks.web", 1, Some(4096)),
        ("db", 1, None),
        ("tasks.db", 1, None),
        ("alias4", 1, None),
        ("web.1", 1, None),
        ("web", 28, None),
        ("_web._tcp.web", 33, None),
        ("250.1.0.10.in-addr.arpa", 12, None),
        ("4.1.0.10.in-addr.arpa", 12, Some(1232)),
        ("example.org", 1, None),
        ("web", 255, None),
    ];
    for (i, (name, t, edns)) in qs.iter().enumerate() {
        write(dir, &format!("query-{i:02}"), &dns_query(0x1000 + i as u16, name, *t, *edns))?;
    }
    Ok(())
}
