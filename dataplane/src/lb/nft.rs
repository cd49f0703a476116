//! The nftables backend, for kernels where the eBPF programs cannot load (ADR 0009): in each
//! task's network namespace, one table `ip swarmnet` owned by swarmnet, built typed and
//! changed only by atomic transactions (`crate::nft`, ADR 0021). The output hook DNATs a VIP
//! (every port, TCP and UDP) with `numgen inc mod N` over the service's active tasks, one
//! chain per backend with a counter (connections handed to it: a NAT chain sees the first
//! packet of a connection only); a VIP without active tasks is rejected (TCP reset:
//! ECONNREFUSED at `connect()`; UDP: an ICMP port unreachable). `ct state invalid drop` keeps
//! clashing tuples from leaking un-NATed. The application's socket keeps the VIP as its peer
//! (conntrack reverses the reply).
//!
//! The rules live in the task namespaces, so they outlive the agent. What each namespace
//! holds is this backend's own record (`<data-dir>/lb-nftables.json`, written after every
//! transaction): a restarted agent changes an adopted task's table from what the record says
//! it holds, never from the kernel's chain names; only counters are read from the kernel
//! (`lb ls`), by the chain names the record gives. A new task's namespace gets its whole
//! table in one transaction. UDP flows to a task that left are deleted over ctnetlink.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use swarmnet_types::{SinkError, TaskId};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{BackendRow, BackendState, Kind, LbBackend, ServiceLb, ServiceRow};
use crate::nft::{self, Expression, NfChainType, NfFamily, NfHook, SetItem, SetType, Statement, Tx};

const TABLE: &str = "swarmnet";
const FAM: NfFamily = NfFamily::IP;

fn hex(ip: Ipv4Addr) -> String {
    ip.octets().iter().map(|b| format!("{b:02x}")).collect()
}

fn svc_chain(vip: Ipv4Addr) -> String {
    format!("s_{}", hex(vip))
}

fn be_chain(vip: Ipv4Addr, ip: Ipv4Addr) -> String {
    format!("b_{}_{}", hex(vip), hex(ip))
}

/// What one namespace's table holds for one VIP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct NsVip {
    /// Backend chains made.
    backends: BTreeSet<Ipv4Addr>,
    /// Dispatched (some task active), else refused.
    active: bool,
    /// The network's VNI.
    vni: u32,
}

/// What one namespace's table holds, and its networks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct NsRecord {
    vnis: Vec<u32>,
    made: BTreeMap<Ipv4Addr, NsVip>,
}

/// The backend's record: what it programmed, for the next agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    services: BTreeMap<Ipv4Addr, ServiceLb>,
    tasks: BTreeMap<TaskId, NsRecord>,
}

struct TaskNs {
    netns: File,
    rec: NsRecord,
}

struct State {
    services: BTreeMap<Ipv4Addr, ServiceLb>,
    tasks: BTreeMap<TaskId, TaskNs>,
    /// What an earlier agent's record says of tasks not added again yet (dropped once the
    /// start is long past: a task gone while no agent ran is never added again).
    earlier: Record,
    /// Connections handed out from namespaces that are gone, per (VIP, backend).
    retired: BTreeMap<(Ipv4Addr, Ipv4Addr), u64>,
}

pub struct NftLb {
    state: Mutex<State>,
    record: PathBuf,
    started: Instant,
}

/// How long an earlier agent's record of a task waits for the task to be added again.
const EARLIER_KEPT: Duration = Duration::from_secs(60);

fn active(s: &ServiceLb) -> Vec<Ipv4Addr> {
    s.backends.iter().filter(|b| b.state == BackendState::Active).map(|b| b.ip).collect()
}

/// The rule of a service's chain: round robin over its active backends.
fn numgen(vip: Ipv4Addr, active: &[Ipv4Addr]) -> Statement<'static> {
    let arms = active.iter().enumerate().map(|(i, ip)| SetItem::Mapping(nft::n(u32::try_from(i).unwrap_or(u32::MAX)), nft::goto(&be_chain(vip, *ip)))).collect();
    Statement::VerdictMap(nft::VerdictMap { key: nft::numgen_inc(u32::try_from(active.len()).unwrap_or(u32::MAX)), data: nft::set(arms) })
}

fn backend_chain(tx: &mut Tx, vip: Ipv4Addr, ip: Ipv4Addr) {
    let c = be_chain(vip, ip);
    tx.add(nft::chain(FAM, TABLE, &c));
    tx.add(nft::rule(FAM, TABLE, &c, vec![nft::counter(), nft::dnat(ip.to_string(), None)]));
}

fn service_chain(tx: &mut Tx, vip: Ipv4Addr, act: &[Ipv4Addr]) {
    let sc = svc_chain(vip);
    tx.add(nft::chain(FAM, TABLE, &sc));
    tx.flush_chain(FAM, TABLE, &sc);
    tx.add(nft::rule(FAM, TABLE, &sc, vec![numgen(vip, act)]));
}

/// The whole table of one namespace, replacing what was there in one transaction.
fn full_table(services: &[&ServiceLb]) -> (Tx, BTreeMap<Ipv4Addr, NsVip>) {
    let mut made = BTreeMap::new();
    let mut tx = Tx::new();
    tx.replace_table(FAM, TABLE);
    let mut vips = Vec::new();
    let mut refused = Vec::new();
    for s in services {
        let act = active(s);
        for b in &s.backends {
            backend_chain(&mut tx, s.vip, b.ip);
        }
        if act.is_empty() {
            refused.push(nft::s(s.vip.to_string()));
        } else {
            service_chain(&mut tx, s.vip, &act);
            vips.push((nft::s(s.vip.to_string()), svc_chain(s.vip)));
        }
        made.insert(s.vip, NsVip { backends: s.backends.iter().map(|b| b.ip).collect(), active: !act.is_empty(), vni: s.vni });
    }
    tx.verdict_map(FAM, TABLE, "vips", &["ipv4_addr"], vips);
    tx.add(nft::named_set(FAM, TABLE, "refused", &[SetType::Ipv4Addr], refused));
    tx.add(nft::base_chain(FAM, TABLE, "out", NfChainType::NAT, NfHook::Output, -100));
    tx.add(nft::rule(FAM, TABLE, "out", vec![Statement::VerdictMap(nft::VerdictMap { key: nft::field("ip", "daddr"), data: nft::s("@vips") })]));
    tx.add(nft::base_chain(FAM, TABLE, "filter_out", NfChainType::Filter, NfHook::Output, 0));
    let new = || nft::m(nft::ct("state"), nft::Operator::IN, nft::s("new"));
    let refused_dst = || nft::eq(nft::field("ip", "daddr"), nft::s("@refused"));
    tx.add(nft::rule(FAM, TABLE, "filter_out", vec![nft::m(nft::ct("state"), nft::Operator::IN, nft::s("invalid")), Statement::Drop(None)]));
    tx.add(nft::rule(FAM, TABLE, "filter_out", vec![new(), refused_dst(), nft::eq(nft::meta(nft::MetaKey::L4proto), nft::s("tcp")), nft::reject_tcp_reset()]));
    tx.add(nft::rule(FAM, TABLE, "filter_out", vec![new(), refused_dst(), Statement::Reject(None)]));
    tx.add(nft::base_chain(FAM, TABLE, "filter_in", NfChainType::Filter, NfHook::Input, 0));
    tx.add(nft::rule(FAM, TABLE, "filter_in", vec![nft::m(nft::ct("state"), nft::Operator::IN, nft::s("invalid")), Statement::Drop(None)]));
    (tx, made)
}

fn element(tx: &mut Tx, delete: bool, name: &str, e: Expression<'static>) {
    let o = nft::elements(FAM, TABLE, name, vec![e]);
    if delete {
        tx.delete(o);
    } else {
        tx.add(o);
    }
}

/// The changes that make one namespace's table hold `s` (or, with None, no longer hold
/// `vip`), given what it holds; what it holds then; and the backends that left.
fn change(tx: &mut Tx, vip: Ipv4Addr, s: Option<&ServiceLb>, had: Option<&NsVip>) -> (Option<NsVip>, Vec<Ipv4Addr>) {
    let old = had.cloned().unwrap_or_default();
    let existed = had.is_some();
    let want: BTreeSet<Ipv4Addr> = s.map(|s| s.backends.iter().map(|b| b.ip).collect()).unwrap_or_default();
    let act = s.map(active).unwrap_or_default();
    for ip in want.difference(&old.backends) {
        backend_chain(tx, vip, *ip);
    }
    let sc = svc_chain(vip);
    let to_vips = || Expression::List(vec![nft::s(vip.to_string()), nft::goto(&sc)]);
    match s {
        Some(_) if !act.is_empty() => {
            service_chain(tx, vip, &act);
            if !(existed && old.active) {
                if existed {
                    element(tx, true, "refused", nft::s(vip.to_string()));
                }
                element(tx, false, "vips", to_vips());
            }
        }
        Some(_) => {
            if existed && old.active {
                element(tx, true, "vips", nft::s(vip.to_string()));
                tx.delete(nft::chain(FAM, TABLE, &sc));
            }
            if !existed || old.active {
                element(tx, false, "refused", nft::s(vip.to_string()));
            }
        }
        None => {
            if existed && old.active {
                element(tx, true, "vips", nft::s(vip.to_string()));
                tx.delete(nft::chain(FAM, TABLE, &sc));
            } else if existed {
                element(tx, true, "refused", nft::s(vip.to_string()));
            }
        }
    }
    let gone: Vec<Ipv4Addr> = old.backends.difference(&want).copied().collect();
    for ip in &gone {
        let c = be_chain(vip, *ip);
        tx.flush_chain(FAM, TABLE, &c);
        tx.delete(nft::chain(FAM, TABLE, &c));
    }
    let now = s.map(|s| NsVip { backends: want, active: !act.is_empty(), vni: s.vni });
    (now, gone)
}

impl NftLb {
    /// Checks that `nft` runs, and reads the record an earlier agent left at `record`.
    pub fn open(record: PathBuf) -> Result<NftLb, String> {
        let out = std::process::Command::new("nft").arg("--version").output().map_err(|e| format!("nft: {e} (install nftables)"))?;
        if !out.status.success() {
            return Err(format!("nft --version failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        let earlier = match crate::state::read_json::<Record>(&record) {
            Ok(r) => r.unwrap_or_default(),
            Err(e) => {
                warn!(error = %e, "load balancer (nftables): the record of what an earlier agent programmed cannot be read: adopted tasks get their whole table again");
                Record::default()
            }
        };
        if !earlier.tasks.is_empty() {
            info!(tasks = earlier.tasks.len(), vips = earlier.services.len(), "load balancer (nftables): the record of an earlier agent");
        }
        Ok(NftLb { state: Mutex::new(State { services: BTreeMap::new(), tasks: BTreeMap::new(), earlier, retired: BTreeMap::new() }), record, started: Instant::now() })
    }

    /// Writes the record of what every namespace holds.
    fn save(&self, st: &mut State) {
        if self.started.elapsed() > EARLIER_KEPT {
            st.earlier.tasks.clear();
        }
        let mut rec = Record { services: st.services.clone(), tasks: st.earlier.tasks.clone() };
        for (id, t) in &st.tasks {
            rec.tasks.insert(id.clone(), t.rec.clone());
        }
        for (vip, s) in &st.earlier.services {
            rec.services.entry(*vip).or_insert_with(|| s.clone());
        }
        if let Err(e) = crate::state::write_json(&self.record, &rec, 0o600) {
            warn!(error = %e, "load balancer (nftables): cannot write its record (a restarted agent gives adopted tasks their whole table again)");
        }
    }

    /// Forgets UDP flows from `netns` to `vip` answered by `ip` (over ctnetlink), so the next
    /// datagram is steered again (to a task that is there).
    async fn clear_udp(netns: &File, vip: Ipv4Addr, ip: Ipv4Addr) {
        let Ok(f) = netns.try_clone() else { return };
        let r = tokio::task::spawn_blocking(move || crate::netns::in_netns(&f, || crate::netlink::delete_udp_flows(vip, ip))).await;
        match r {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => warn!(vip = %vip, backend = %ip, error = %e, "load balancer (nftables): could not clear UDP flows"),
            Ok(Err(e)) => warn!(vip = %vip, backend = %ip, error = %e, "load balancer (nftables): could not clear UDP flows"),
            Err(e) => warn!(vip = %vip, backend = %ip, error = %e, "load balancer (nftables): could not clear UDP flows"),
        }
    }

    /// Brings every task namespace to hold each of `changes` (VIP → the service, or None:
    /// not hold it), one transaction per namespace. Returns, per VIP, why it failed where
    /// it did.
    async fn apply(&self, st: &mut State, changes: &[(Ipv4Addr, Option<&ServiceLb>)]) -> BTreeMap<Ipv4Addr, Vec<String>> {
        let mut failed: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
        let ids: Vec<TaskId> = st.tasks.keys().cloned().collect();
        for id in ids {
            let Some(t) = st.tasks.get(&id) else { continue };
            let mut tx = Tx::new();
            let mut after = Vec::new();
            for (vip, s) in changes {
                // A VIP is on a namespace's networks, or held by it already (a removal).
                let concerned = match s {
                    Some(s) => t.rec.vnis.contains(&s.vni),
                    None => t.rec.made.contains_key(vip),
                };
                if !concerned {
                    continue;
                }
                let (now, gone) = change(&mut tx, *vip, *s, t.rec.made.get(vip));
                after.push((*vip, now, gone));
            }
            if after.is_empty() {
                continue;
            }
            let Ok(netns) = t.netns.try_clone() else { continue };
            match nft::apply(Some(&netns), &tx).await {
                Ok(()) => {
                    for (vip, now, gone) in after {
                        if let Some(t) = st.tasks.get_mut(&id) {
                            match now {
                                Some(n) => t.rec.made.insert(vip, n),
                                None => t.rec.made.remove(&vip),
                            };
                        }
                        for ip in gone {
                            Self::clear_udp(&netns, vip, ip).await;
                        }
                    }
                }
                Err(e) => {
                    for (vip, _, _) in after {
                        failed.entry(vip).or_default().push(format!("task {id}: {e}"));
                    }
                }
            }
        }
        failed
    }

    /// Connections handed to each backend of each VIP by the table of `netns`, by the chain
    /// names `made` gives (an absent table: none).
    async fn counters(netns: &File, made: &BTreeMap<Ipv4Addr, NsVip>) -> Result<BTreeMap<(Ipv4Addr, Ipv4Addr), u64>, SinkError> {
        let Some(objs) = nft::list_table(Some(netns), FAM, TABLE).await? else { return Ok(BTreeMap::new()) };
        let packets = nft::chain_packets(&objs);
        let mut out = BTreeMap::new();
        for (vip, v) in made {
            for ip in &v.backends {
                out.insert((*vip, *ip), packets.get(&be_chain(*vip, *ip)).copied().unwrap_or(0));
            }
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl LbBackend for NftLb {
    fn kind(&self) -> Kind {
        Kind::Nftables
    }

    async fn set(&self, svcs: &[ServiceLb]) -> Vec<Result<(), SinkError>> {
        let mut st = self.state.lock().await;
        let changes: Vec<(Ipv4Addr, Option<&ServiceLb>)> = svcs.iter().map(|s| (s.vip, Some(s))).collect();
        let failed = self.apply(&mut st, &changes).await;
        let out = svcs
            .iter()
            .map(|s| match failed.get(&s.vip) {
                Some(why) => Err(why.join("; ").into()),
                None => {
                    st.services.insert(s.vip, s.clone());
                    Ok(())
                }
            })
            .collect();
        self.save(&mut st);
        out
    }

    async fn remove(&self, vips: &[Ipv4Addr]) -> Vec<Result<(), SinkError>> {
        let mut st = self.state.lock().await;
        // Also VIPs this agent never programmed (an earlier agent's, in an adopted task's
        // table): every namespace that holds one loses it.
        let changes: Vec<(Ipv4Addr, Option<&ServiceLb>)> = vips.iter().map(|v| (*v, None)).collect();
        let failed = self.apply(&mut st, &changes).await;
        let out = vips
            .iter()
            .map(|v| match failed.get(v) {
                Some(why) => Err(why.join("; ").into()),
                None => {
                    st.services.remove(v);
                    st.earlier.services.remove(v);
                    Ok(())
                }
            })
            .collect();
        self.save(&mut st);
        out
    }

    /// Every VIP the tasks' tables hold: its backends (active or draining, as programmed)
    /// and the connections handed to each, summed over the namespaces of this node's tasks
    /// (and those gone since this agent started); at the start, also what an earlier agent's
    /// record says of tasks not added again yet.
    async fn read(&self) -> Result<Vec<ServiceRow>, SinkError> {
        let st = self.state.lock().await;
        let mut rows: BTreeMap<Ipv4Addr, (u32, BTreeMap<Ipv4Addr, u64>)> = BTreeMap::new();
        for t in st.tasks.values() {
            let counts = Self::counters(&t.netns, &t.rec.made).await?;
            for (vip, v) in &t.rec.made {
                let row = rows.entry(*vip).or_insert_with(|| (v.vni, BTreeMap::new()));
                for ip in &v.backends {
                    *row.1.entry(*ip).or_default() += counts.get(&(*vip, *ip)).copied().unwrap_or(0);
                }
            }
        }
        for rec in st.earlier.tasks.values() {
            for (vip, v) in &rec.made {
                let row = rows.entry(*vip).or_insert_with(|| (v.vni, BTreeMap::new()));
                for ip in &v.backends {
                    row.1.entry(*ip).or_default();
                }
            }
        }
        let state_of = |vip: Ipv4Addr, ip: Ipv4Addr| {
            st.services.get(&vip).or_else(|| st.earlier.services.get(&vip)).and_then(|s| s.backends.iter().find(|b| b.ip == ip)).map_or(BackendState::Draining, |b| b.state)
        };
        Ok(rows
            .into_iter()
            .map(|(vip, (vni, backends))| ServiceRow {
                vip,
                vni,
                backends: backends.into_iter().map(|(ip, n)| BackendRow { ip, state: state_of(vip, ip), connections: n + st.retired.get(&(vip, ip)).copied().unwrap_or(0) }).collect(),
            })
            .collect())
    }

    async fn add_task(&self, task: &TaskId, netns: &File, vnis: &[u32]) -> Result<(), SinkError> {
        let mut st = self.state.lock().await;
        let mine: Vec<ServiceLb> = st.services.values().filter(|s| vnis.contains(&s.vni)).cloned().collect();
        let rec = match st.earlier.tasks.remove(task) {
            // A task adopted after a restart: its table goes on as the record says it is;
            // what this agent already programmed since is brought into it in one
            // transaction, and the rest changes from there.
            Some(mut rec) => {
                let mut tx = Tx::new();
                let mut after = Vec::new();
                for s in &mine {
                    let (now, _) = change(&mut tx, s.vip, Some(s), rec.made.get(&s.vip));
                    after.push((s.vip, now));
                }
                nft::apply(Some(netns), &tx).await.map_err(|e| format!("task {task}: {e}"))?;
                for (vip, now) in after {
                    if let Some(n) = now {
                        rec.made.insert(vip, n);
                    }
                }
                rec.vnis = vnis.to_vec();
                rec
            }
            None => {
                let (tx, made) = full_table(&mine.iter().collect::<Vec<_>>());
                nft::apply(Some(netns), &tx).await.map_err(|e| format!("task {task}: {e}"))?;
                NsRecord { vnis: vnis.to_vec(), made }
            }
        };
        st.tasks.insert(task.clone(), TaskNs { netns: netns.try_clone()?, rec });
        self.save(&mut st);
        Ok(())
    }

    async fn remove_task(&self, task: &TaskId, netns: Option<&File>, _vnis: &[u32]) -> Result<(), SinkError> {
        let mut st = self.state.lock().await;
        // The table goes with the namespace; its counters are kept for `lb ls`.
        let known = st.tasks.remove(task);
        st.earlier.tasks.remove(task);
        let ns = match (&known, netns) {
            (Some(t), _) => Some(t.netns.try_clone()?),
            (None, Some(f)) => Some(f.try_clone()?),
            (None, None) => None,
        };
        if let (Some(ns), Some(t)) = (ns, &known) {
            if let Ok(counts) = Self::counters(&ns, &t.rec.made).await {
                for (k, n) in counts {
                    *st.retired.entry(k).or_default() += n;
                }
            }
        }
        self.save(&mut st);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::BackendLb;
    use crate::nft::summary as cmds;

    fn svc(states: &[(u8, BackendState)]) -> ServiceLb {
        ServiceLb {
            vip: Ipv4Addr::new(10, 0, 0, 2),
            network: "n".into(),
            vni: 4096,
            service: "web".into(),
            backends: states.iter().map(|(l, s)| BackendLb { task: format!("t{l}"), ip: Ipv4Addr::new(10, 0, 0, *l), state: *s }).collect(),
        }
    }

    use BackendState::{Active, Draining};

    #[test]
    fn a_whole_table_replaces_what_was_there_in_one_transaction() {
        let a = svc(&[(3, Active), (4, Draining)]);
        let (tx, made) = full_table(&[&a]);
        let (c, json) = cmds(&tx);
        assert_eq!(&c[..3], &["add table swarmnet", "delete table swarmnet", "add table swarmnet"], "replaced whole");
        assert!(c.contains(&"add rule b_0a000002_0a000004".to_string()), "a draining backend keeps its chain: {c:?}");
        assert!(json.contains(r#"{"vmap":{"data":{"set":[[0,{"goto":{"target":"b_0a000002_0a000003"}}]]},"key":{"numgen":{"mod":1,"mode":"inc"}}}}"#), "only active ones are chosen: {json}");
        assert!(json.contains(r#"{"add":{"map":{"family":"ip","map":"verdict","name":"vips","table":"swarmnet","type":"ipv4_addr"}}}"#), "{json}");
        assert!(json.contains(r#"["10.0.0.2",{"goto":{"target":"s_0a000002"}}]"#), "{json}");
        assert!(json.contains(r#"{"match":{"left":{"ct":{"key":"state"}},"op":"in","right":"invalid"}},{"drop":null}"#), "ct state invalid drop: {json}");
        assert_eq!(made[&a.vip], NsVip { backends: [Ipv4Addr::new(10, 0, 0, 3), Ipv4Addr::new(10, 0, 0, 4)].into(), active: true, vni: 4096 });
    }

    #[test]
    fn changes_are_incremental_and_a_vip_without_tasks_is_refused() {
        let vip = Ipv4Addr::new(10, 0, 0, 2);
        let one = svc(&[(3, Active)]);
        let mut tx = Tx::new();
        let (now, gone) = change(&mut tx, vip, Some(&one), None);
        assert_eq!(cmds(&tx).0, vec!["add chain b_0a000002_0a000003", "add rule b_0a000002_0a000003", "add chain s_0a000002", "flush chain s_0a000002", "add rule s_0a000002", "add element vips"]);
        assert!(gone.is_empty());
        let had = now.expect("held");
        // .3 drains, .4 arrives: .3's chain stays (its counter too), the rotation is .4 only.
        let two = svc(&[(3, Draining), (4, Active)]);
        let mut tx = Tx::new();
        let (now, gone) = change(&mut tx, vip, Some(&two), Some(&had));
        let (c, json) = cmds(&tx);
        assert!(!c.contains(&"delete chain b_0a000002_0a000003".to_string()), "{c:?}");
        assert!(json.contains(r#"[0,{"goto":{"target":"b_0a000002_0a000004"}}]"#) && !json.contains(r#"[1,"#), "{json}");
        assert!(!c.contains(&"add element vips".to_string()), "already dispatched: {c:?}");
        assert!(gone.is_empty());
        // Nobody active: out of the map, into the refused set; .3 left entirely.
        let had = now.expect("held");
        let none = svc(&[(4, Draining)]);
        let mut tx = Tx::new();
        let (now, gone) = change(&mut tx, vip, Some(&none), Some(&had));
        let c = cmds(&tx).0;
        assert!(c.contains(&"delete element vips".to_string()) && c.contains(&"add element refused".to_string()), "{c:?}");
        assert!(c.ends_with(&["flush chain b_0a000002_0a000003".to_string(), "delete chain b_0a000002_0a000003".to_string()]), "{c:?}");
        assert_eq!(gone, vec![Ipv4Addr::new(10, 0, 0, 3)]);
        // Removed: out of the refused set, chains gone.
        let mut tx = Tx::new();
        let (now, _) = change(&mut tx, vip, None, now.as_ref());
        let c = cmds(&tx).0;
        assert!(c.contains(&"delete element refused".to_string()) && c.contains(&"delete chain b_0a000002_0a000004".to_string()), "{c:?}");
        assert!(now.is_none());
    }

    #[test]
    fn the_record_round_trips_and_says_which_network_a_vip_is_on() {
        let a = svc(&[(3, Active)]);
        let (_, made) = full_table(&[&a]);
        let rec = Record { services: [(a.vip, a.clone())].into(), tasks: [("t1".to_string(), NsRecord { vnis: vec![4096], made })].into() };
        let back: Record = serde_json::from_str(&serde_json::to_string(&rec).expect("json")).expect("back");
        assert_eq!(back, rec);
        assert_eq!(back.tasks["t1"].made[&a.vip].vni, 4096);
    }
}
