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
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

impl Etcd {
    fn start(name: &str) -> Etcd {
        let dir = std::env::temp_dir().join(format!("sn-etcd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd's folder");
        let mut e = Etcd { child: None, dir, client: free_port(), peer: free_port() };
        e.run();
        e
    }

    fn run(&mut self) {
        let c = format!("http://127.0.0.1:{}", self.client);
        let p = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::File::create(self.dir.join("etcd.log")).expect("etcd's log");
        let child = Command::new("etcd")
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
