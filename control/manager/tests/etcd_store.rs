//! The etcd store against a real etcd (Debian's `etcd-server`, started here on loopback with
//! a data folder of its own): the conformance suite every store passes, then leadership and
//! fencing, an incomplete entry of a manager that died, a commit whose answer was lost,
//! etcd restarted with its data, and bad input (etcd unreachable, a foreign prefix).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use swarmnet_manager::model::{ClusterState, TaskState};
use swarmnet_manager::store::conformance::{self, sample_meta, sample_state};
use swarmnet_manager::store::{diff, log, meta_write, EtcdConfig, EtcdStore, Store, StoreError};

/// One etcd member on loopback, stopped (by its PID) when dropped.
struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client: u16,
    peer: u16,
    /// Clients over TLS with a certificate of this CA (`ca.pem`, `server.pem`,
    /// `server-key.pem` in `dir`).
    tls: bool,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

impl Etcd {
    fn start(name: &str) -> Etcd {
        let dir = std::env::temp_dir().join(format!("sn-etcd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd's folder");
        let mut e = Etcd { child: None, dir, client: free_port(), peer: free_port(), tls: false };
        e.run();
        e
    }

    /// A member whose clients must present a certificate of the CA written to
    /// `dir/ca.pem` (with the server's certificate for 127.0.0.1).
    fn start_tls(name: &str, ca: &TestCa) -> Etcd {
        let dir = std::env::temp_dir().join(format!("sn-etcd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd's folder");
        ca.write(&dir, "ca.pem");
        ca.issue(&dir, "server", true);
        let mut e = Etcd { child: None, dir, client: free_port(), peer: free_port(), tls: true };
        e.run();
        e
    }

    fn run(&mut self) {
        let c = format!("{}://127.0.0.1:{}", if self.tls { "https" } else { "http" }, self.client);
        let p = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::File::create(self.dir.join("etcd.log")).expect("etcd's log");
        let mut cmd = Command::new("etcd");
        if self.tls {
            let f = |n: &str| self.dir.join(n).display().to_string();
            cmd.args(["--cert-file", &f("server.pem"), "--key-file", &f("server-key.pem"), "--trusted-ca-file", &f("ca.pem"), "--client-cert-auth"]);
        }
        let child = cmd
            .args(["--name", "e1", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c, "--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
            .args(["--initial-cluster", &format!("e1={p}"), "--initial-cluster-state", "new"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd ({e}): `bash .ci/setup` installs etcd-server"));
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.client)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "etcd did not listen within 20 s: {}", std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("etcd runs").id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().expect("kill").success());
        if sig == "-STOP" {
            // The stop is delivered to each thread in turn: until every one has stopped,
            // etcd may still read a request the test means it not to.
            let stopped = || {
                std::fs::read_dir(format!("/proc/{pid}/task"))
                    .is_ok_and(|d| d.flatten().all(|t| std::fs::read_to_string(t.path().join("stat")).is_ok_and(|st| st.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('T')))))
            };
            let t = Instant::now();
            while !stopped() {
                assert!(t.elapsed() < Duration::from_secs(5), "etcd (pid {pid}) did not stop within 5 s");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cfg(&self, prefix: &str) -> EtcdConfig {
        let mut c = EtcdConfig::new(vec![format!("127.0.0.1:{}", self.client)], prefix);
        c.timeout = Duration::from_secs(2);
        c
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA of the test's own, which issues etcd's server certificate and clients'.
struct TestCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().expect("key");
        let pem = params.self_signed(&key).expect("CA").pem();
        TestCa { params, key, pem }
    }

    fn write(&self, dir: &std::path::Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.pem).expect("write the CA");
        p
    }

    /// `dir/<name>.pem` and `dir/<name>-key.pem`: a server's certificate for 127.0.0.1, or a
    /// client's.
    fn issue(&self, dir: &std::path::Path, name: &str, server: bool) -> (PathBuf, PathBuf) {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        if server {
            p.subject_alt_names.push(rcgen::SanType::IpAddress("127.0.0.1".parse().expect("ip")));
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }
        let key = rcgen::KeyPair::generate().expect("key");
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).expect("sign");
        let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
        std::fs::write(&c, cert.pem()).expect("write the certificate");
        std::fs::write(&k, key.serialize_pem()).expect("write the key");
        (c, k)
    }
}

fn leader(cfg: &EtcdConfig, who: &str) -> EtcdStore {
    let s = EtcdStore::connect(cfg.clone()).expect("connect");
    s.campaign(who, Duration::from_secs(10)).expect("campaign");
    s
}

/// A raw client on the same etcd, for what a test does behind the store's back.
fn raw(e: &Etcd) -> (tokio::runtime::Runtime, etcd_client::Client) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let c = rt.block_on(etcd_client::Client::connect([format!("127.0.0.1:{}", e.client)], None)).expect("raw client");
    (rt, c)
}

fn keys(rt: &tokio::runtime::Runtime, c: &mut etcd_client::Client, prefix: &str) -> Vec<String> {
    let r = rt.block_on(c.get(prefix, Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()))).expect("get");
    r.kvs().iter().map(|k| String::from_utf8_lossy(k.key()).into_owned()).collect()
}

#[test]
fn etcd_passes_the_conformance_suite_with_parts_and_snapshots() {
    let e = Etcd::start("conf");
    let mut cfg = e.cfg("/conf");
    // Small parts and frequent snapshots, so that the suite crosses both.
    cfg.part_size = 64 * 1024;
    cfg.snapshot_every = 50;
    let mut opened = 0;
    conformance::run(&mut || {
        opened += 1;
        Box::new(leader(&cfg, &format!("manager {opened}")))
    });
    let (rt, mut c) = raw(&e);
    let all = keys(&rt, &mut c, "/conf/");
    let log: Vec<&String> = all.iter().filter(|k| k.starts_with("/conf/log/")).collect();
    let snaps: std::collections::BTreeSet<&str> = all.iter().filter_map(|k| k.strip_prefix("/conf/snapdata/")).filter_map(|k| k.split('/').next()).collect();
    assert!(all.contains(&"/conf/snap".to_string()) && all.contains(&"/conf/cluster".to_string()), "{all:?}");
    assert!(log.len() < 60, "the log was cut at each snapshot: {} keys", log.len());
    assert_eq!(snaps.len(), 1, "one snapshot kept: {snaps:?}");
}

#[test]
fn one_leader_at_a_time_and_a_deposed_one_writes_nothing() {
    let e = Etcd::start("fence");
    let cfg = e.cfg("/fence");
    let a = leader(&cfg, "manager a");
    let meta = sample_meta("c-fence");
    a.commit(&[meta_write(&meta).expect("meta")]).expect("a writes");
    let b = EtcdStore::connect(cfg.clone()).expect("connect b");
    match b.campaign("manager b", Duration::from_secs(1)) {
        Err(StoreError::NotLeader(m)) => assert!(m.contains("manager a") && m.contains("etcd://127.0.0.1"), "{m}"),
        other => panic!("b must not lead while a does: {other:?}"),
    }
    assert!(matches!(b.commit(&diff(&ClusterState::default(), &sample_state(1)).expect("diff")), Err(StoreError::NotLeader(_))), "b is not the leader");
    // a's lease ends behind its back (as when a is cut off): b is elected, a is fenced out.
    let (rt, mut c) = raw(&e);
    let leases = rt.block_on(c.leases()).expect("leases");
    for l in leases.leases() {
        rt.block_on(c.lease_revoke(l.id())).expect("revoke");
    }
    b.campaign("manager b", Duration::from_secs(10)).expect("b is elected");
    let st = sample_state(2);
    let refused = a.commit(&diff(&ClusterState::default(), &st).expect("diff"));
    assert!(matches!(refused, Err(StoreError::NotLeader(_))), "a deposed leader cannot write: {refused:?}");
    let (m, loaded) = b.load().expect("b loads");
    assert_eq!(m.map(|m| m.cluster_id), Some("c-fence".into()));
    assert_eq!(loaded, ClusterState::default(), "nothing of a's refused commit");
    b.commit(&diff(&ClusterState::default(), &st).expect("diff")).expect("b writes");
    assert_eq!(b.load().expect("load").1, st);
    assert!(b.is_leader() && !a.is_leader());
}

#[test]
fn the_next_leader_removes_an_incomplete_entry_and_a_lost_answer_is_settled() {
    let mut e = Etcd::start("tail");
    let mut cfg = e.cfg("/tail");
    cfg.lease_ttl = Duration::from_secs(6);
    cfg.timeout = Duration::from_secs(1);
    let a = leader(&cfg, "manager a");
    a.commit(&[meta_write(&sample_meta("c-tail")).expect("meta")]).expect("meta");
    let one = sample_state(2);
    a.commit(&diff(&ClusterState::default(), &one).expect("diff")).expect("commit");

    // A commit whose answer is lost: etcd is paused while the store waits for it. The
    // request may still land (here the test writes it as it would have landed), or not.
    let (rt, mut c) = raw(&e);
    let last_entry = |rt: &tokio::runtime::Runtime, c: &mut etcd_client::Client| -> u64 {
        keys(rt, c, "/tail/log/").iter().filter_map(|k| k.split('/').nth(3)).filter_map(|s| u64::from_str_radix(s, 16).ok()).max().expect("entries")
    };
    let settled = |a: &EtcdStore| {
        let t = Instant::now();
        loop {
            match a.refresh() {
                Ok(x) => return x,
                Err(e) if t.elapsed() < Duration::from_secs(20) => {
                    eprintln!("refresh: {e}");
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => panic!("not settled within 20 s: {e}"),
            }
        }
    };
    let mut two = one.clone();
    two.tasks.values_mut().for_each(|t| t.state = TaskState::Failed);
    let seq = last_entry(&rt, &mut c) + 1;
    e.signal("-STOP");
    let writes = diff(&one, &two).expect("diff");
    let r = a.commit(&writes);
    e.signal("-CONT");
    match r {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("no answer") && m.contains("etcd://127.0.0.1"), "{m}"),
        other => panic!("a paused etcd cannot answer: {other:?}"),
    }
    for (i, part) in log::split(&log::encode(&writes), cfg.part_size).into_iter().enumerate() {
        rt.block_on(c.put(format!("/tail/log/{seq:016x}/{i:08x}"), part, None)).expect("the late request");
    }
    // Before anything else is written the store looks the entry up; the caller continues
    // from what the store holds.
    let (_, st) = settled(&a).expect("the commit landed late: the caller must take the store's state");
    assert_eq!(st, two, "the late commit counts");
    assert!(a.refresh().expect("refresh").is_none(), "settled once");

    // One that does not land (etcd is killed while the request waits in its socket, and
    // started again with its data): settled as not there, for good (a tombstone takes its
    // number, so that the request, were it to come late, would fail its compare).
    let seq = last_entry(&rt, &mut c) + 1;
    e.signal("-STOP");
    let r = a.commit(&diff(&two, &one).expect("diff"));
    e.kill();
    e.run();
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    let (rt, mut c) = raw(&e);
    assert!(settled(&a).is_none(), "nothing to take: the commit is not in the store");
    assert_eq!(a.load().expect("load").1, two, "as before the lost commit");
    let tomb = rt.block_on(c.get(format!("/tail/log/{seq:016x}/{:08x}", 0), None)).expect("get");
    let tomb = tomb.kvs().first().map(|k| k.value().to_vec()).expect("a tombstone under the lost commit's number");
    assert_eq!(log::decode(&tomb[4..]).expect("decode"), vec![], "an empty entry");
    let mut three = two.clone();
    three.services.clear();
    a.commit(&diff(&two, &three).expect("diff")).expect("commits go on");
    assert_eq!(a.load().expect("load").1, three);
    let two = three;

    // A manager that dies while writing a large entry leaves part 0 of 2.
    let last: u64 = keys(&rt, &mut c, "/tail/log/").iter().filter_map(|k| k.split('/').nth(3)).filter_map(|s| u64::from_str_radix(s, 16).ok()).max().expect("entries");
    let half = log::split(&[1, 0, 0, 0, 0], 3);
    let key = format!("/tail/log/{:016x}/{:08x}", last + 1, 0);
    rt.block_on(c.put(key.clone(), half[0].clone(), None)).expect("put part 0");
    a.resign();
    drop(a);
    let b = leader(&cfg, "manager b");
    assert!(!keys(&rt, &mut c, "/tail/log/").contains(&key), "the incomplete entry was removed");
    assert_eq!(b.load().expect("load").1, two);
    let mut three = two.clone();
    three.tasks.clear();
    b.commit(&diff(&two, &three).expect("diff")).expect("b writes after it");
    assert_eq!(b.load().expect("load").1, three);
}

#[test]
fn etcd_restarted_with_its_data_and_bad_input() {
    let mut e = Etcd::start("restart");
    let cfg = e.cfg("/restart");
    let a = leader(&cfg, "manager a");
    a.commit(&[meta_write(&sample_meta("c-restart")).expect("meta")]).expect("meta");
    let one = sample_state(3);
    a.commit(&diff(&ClusterState::default(), &one).expect("diff")).expect("commit");
    e.kill();
    let r = a.commit(&diff(&one, &ClusterState::default()).expect("diff"));
    assert!(matches!(r, Err(StoreError::Unavailable(_) | StoreError::NotLeader(_))), "etcd is down: {r:?}");
    e.run();
    // The lease is kept across etcd's restart: the same manager writes again once its
    // renewal gets through, from the state the store holds.
    let t = Instant::now();
    let mut cur = one.clone();
    loop {
        if let Ok(Some((_, st))) = a.refresh() {
            cur = st;
        }
        let mut next = cur.clone();
        next.tasks.clear();
        match a.commit(&diff(&cur, &next).expect("diff")) {
            Ok(()) => break,
            Err(err) if t.elapsed() < Duration::from_secs(20) => {
                eprintln!("after the restart: {err}");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(err) => panic!("no write within 20 s of etcd's restart: {err}"),
        }
    }
    assert_eq!(a.load().expect("load").1.tasks.len(), 0);
    assert_eq!(a.load().expect("load").1.services.len(), 1);

    // Bad input: nothing listens there; a prefix that is not a cluster's.
    let mut nobody = EtcdConfig::new(vec![format!("127.0.0.1:{}", free_port())], "/x");
    nobody.timeout = Duration::from_secs(1);
    let t = Instant::now();
    match EtcdStore::connect(nobody) {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("etcd://127.0.0.1:"), "{m}"),
        Err(other) => panic!("unreachable etcd: {other}"),
        Ok(_) => panic!("nothing listens there"),
    }
    assert!(t.elapsed() < Duration::from_secs(10), "the error comes within the timeout");
    let (rt, mut c) = raw(&e);
    rt.block_on(c.put("/foreign/config", "x", None)).expect("put");
    match EtcdStore::connect(e.cfg("/foreign")) {
        Err(StoreError::Backend { msg, .. }) => assert!(msg.contains("/foreign/config") && msg.contains("--store-prefix"), "{msg}"),
        Err(other) => panic!("a foreign prefix: {other}"),
        Ok(_) => panic!("a foreign prefix is refused"),
    }
}

/// etcd over TLS with client certificates (`--store-ca`, `--store-cert`, `--store-key`):
/// the right ones lead and write; a missing client certificate, one of another CA, a CA
/// that did not sign etcd's, or no TLS at all: an error that names the store, within the
/// timeout, and nothing written.
#[test]
fn etcd_over_tls_and_wrong_credentials() {
    use swarmnet_manager::store::EtcdTls;
    let ca = TestCa::new("sn-test-etcd-ca");
    let e = Etcd::start_tls("tls", &ca);
    let d = e.dir.clone();
    let (cert, key) = ca.issue(&d, "manager", false);
    let other = TestCa::new("sn-test-other-ca");
    let other_ca = other.write(&d, "other-ca.pem");
    let (ocert, okey) = other.issue(&d, "stranger", false);
    let with = |tls: Option<EtcdTls>| {
        let mut c = e.cfg("/tls");
        c.tls = tls;
        c.timeout = Duration::from_secs(2);
        c
    };
    let right = with(Some(EtcdTls { ca: Some(d.join("ca.pem")), cert: Some(cert.clone()), key: Some(key.clone()) }));
    let a = leader(&right, "manager a");
    a.commit(&[meta_write(&sample_meta("c-tls")).expect("meta")]).expect("a write over TLS");
    assert_eq!(a.load().expect("load").0.map(|m| m.cluster_id), Some("c-tls".to_string()));
    let endpoint = format!("127.0.0.1:{}", e.client);
    let wrong = [
        ("no client certificate", Some(EtcdTls { ca: Some(d.join("ca.pem")), cert: None, key: None })),
        ("a client certificate of another CA", Some(EtcdTls { ca: Some(d.join("ca.pem")), cert: Some(ocert), key: Some(okey) })),
        ("a CA that did not sign etcd's certificate", Some(EtcdTls { ca: Some(other_ca), cert: Some(cert.clone()), key: Some(key.clone()) })),
        ("no TLS", None),
        ("a certificate without its key", Some(EtcdTls { ca: Some(d.join("ca.pem")), cert: Some(cert), key: None })),
    ];
    for (what, tls) in wrong {
        let t = Instant::now();
        match EtcdStore::connect(with(tls)) {
            Ok(s) => {
                // Connected lazily: the first request must fail.
                let r = s.campaign("manager b", Duration::from_secs(3));
                assert!(r.is_err(), "{what}: the campaign must fail");
                eprintln!("{what}: {}", r.err().map(|e| e.to_string()).unwrap_or_default());
            }
            Err(err) => {
                let m = err.to_string();
                eprintln!("{what}: {m}");
                assert!(m.contains(&endpoint), "{what}: the error names the store: {m}");
                assert!(m.contains("--store-"), "{what}: the error says which flags to check: {m}");
            }
        }
        assert!(t.elapsed() < Duration::from_secs(15), "{what}: refused within the timeout, not hung");
    }
    assert!(a.is_leader(), "the manager with the right credentials still leads");
    assert_eq!(a.load().expect("load").0.map(|m| m.cluster_id), Some("c-tls".to_string()), "nothing else written");
}
