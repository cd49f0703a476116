//! The nftables backend, for kernels where the eBPF programs cannot load (ADR 0009): in each
//! task's network namespace, one table `ip swarmnet` owned by swarmnet, changed only by
//! atomic `nft -f` transactions. The output hook DNATs a VIP (every port, TCP and UDP) with
//! `numgen inc mod N` over the service's active tasks, one chain per backend with a counter
//! (connections handed to it: a NAT chain sees the first packet of a connection only); a VIP
//! without active tasks is rejected (TCP reset: ECONNREFUSED at `connect()`; UDP: an ICMP
//! port unreachable). `ct state invalid drop` keeps clashing tuples from leaking un-NATed.
//! The application's socket keeps the VIP as its peer (conntrack reverses the reply).
//!
//! The rules live in the task namespaces, so they outlive the agent: a restarted agent reads
//! each adopted task's table back (what it holds, its counters) and changes it from there;
//! a new task's namespace gets its whole table in one transaction. Every VIP has an empty
//! marker chain `v_<vip>_<vni>`, so a table read back says which network a VIP is on.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::net::Ipv4Addr;

use swarmnet_types::{SinkError, TaskId};
use tokio::sync::Mutex;
use tracing::warn;

use super::{BackendRow, BackendState, Kind, LbBackend, ServiceLb, ServiceRow};
use crate::netns::NsWorker;

const TABLE: &str = "ip swarmnet";

fn hex(ip: Ipv4Addr) -> String {
    ip.octets().iter().map(|b| format!("{b:02x}")).collect()
}

fn svc_chain(vip: Ipv4Addr) -> String {
    format!("s_{}", hex(vip))
}

fn vip_chain(vip: Ipv4Addr, vni: u32) -> String {
    format!("v_{}_{vni}", hex(vip))
}

fn parse_hex(h: &str) -> Option<Ipv4Addr> {
    u32::from_str_radix(h, 16).ok().map(Ipv4Addr::from)
}

/// `v_<vip>_<vni>` → (vip, vni).
fn parse_vip_chain(name: &str) -> Option<(Ipv4Addr, u32)> {
    let (v, n) = name.strip_prefix("v_")?.split_once('_')?;
    Some((parse_hex(v)?, n.parse().ok()?))
}

fn be_chain(vip: Ipv4Addr, ip: Ipv4Addr) -> String {
    format!("b_{}_{}", hex(vip), hex(ip))
}

/// `b_<vip>_<ip>` → (vip, ip).
fn parse_be_chain(name: &str) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let rest = name.strip_prefix("b_")?;
    let (v, i) = rest.split_once('_')?;
    Some((parse_hex(v)?, parse_hex(i)?))
}

/// What one namespace's table holds for one VIP.
#[derive(Clone, Debug, Default)]
struct NsVip {
    /// Backend chains made.
    backends: BTreeSet<Ipv4Addr>,
    /// In the `vips` map (some task active), else in the `refused` set.
    active: bool,
    /// The VNI its marker chain names.
    vni: Option<u32>,
}

struct TaskNs {
    netns: File,
    vnis: Vec<u32>,
    made: BTreeMap<Ipv4Addr, NsVip>,
}

#[derive(Default)]
struct State {
    services: BTreeMap<Ipv4Addr, ServiceLb>,
    tasks: BTreeMap<TaskId, TaskNs>,
    /// Connections handed out from namespaces that are gone, per (VIP, backend).
    retired: BTreeMap<(Ipv4Addr, Ipv4Addr), u64>,
}

/// One namespace's table as read back.
#[derive(Debug, Default, PartialEq)]
struct Table {
    vips: BTreeMap<Ipv4Addr, TableVip>,
}

/// One VIP of a table read back.
#[derive(Debug, Default, PartialEq)]
struct TableVip {
    vni: u32,
    /// In the `vips` map (else refused).
    in_map: bool,
    backends: BTreeMap<Ipv4Addr, Chain>,
}

/// One backend chain read back.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Chain {
    /// In the service chain's rotation (else draining).
    rotating: bool,
    /// Connections handed to it.
    packets: u64,
}

fn targets(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("target", serde_json::Value::String(t)) => out.push(t.clone()),
                    _ => targets(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| targets(x, out)),
        _ => {}
    }
}

/// Parses `nft -j list table ip swarmnet`.
fn parse_table(json: &[u8]) -> Result<Table, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_slice(json)?;
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    let mut t = Table::default();
    let mut in_map: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for item in &items {
        if let Some(name) = item["chain"]["name"].as_str() {
            if let Some((vip, vni)) = parse_vip_chain(name) {
                t.vips.entry(vip).or_default().vni = vni;
            }
        }
        if item["map"]["name"] == "vips" {
            for e in item["map"]["elem"].as_array().into_iter().flatten() {
                if let Some(ip) = e[0].as_str().and_then(|s| s.parse().ok()) {
                    in_map.insert(ip);
                }
            }
        }
    }
    for item in &items {
        let rule = &item["rule"];
        let Some(chain) = rule["chain"].as_str() else { continue };
        if let Some((vip, ip)) = parse_be_chain(chain) {
            let packets: u64 = rule["expr"].as_array().into_iter().flatten().filter_map(|e| e["counter"]["packets"].as_u64()).sum();
            if let Some(e) = t.vips.get_mut(&vip) {
                e.backends.entry(ip).or_default().packets += packets;
            }
        } else if let Some(vip) = chain.strip_prefix("s_").and_then(parse_hex) {
            let mut to = Vec::new();
            targets(&rule["expr"], &mut to);
            if let Some(e) = t.vips.get_mut(&vip) {
                for ip in to.iter().filter_map(|c| parse_be_chain(c)).map(|(_, ip)| ip) {
                    e.backends.entry(ip).or_default().rotating = true;
                }
            }
        }
    }
    for (vip, e) in t.vips.iter_mut() {
        e.in_map = in_map.contains(vip);
    }
    Ok(t)
}

pub struct NftLb {
    ns: NsWorker,
    state: Mutex<State>,
}

fn active(s: &ServiceLb) -> Vec<Ipv4Addr> {
    s.backends.iter().filter(|b| b.state == BackendState::Active).map(|b| b.ip).collect()
}

/// The rule of a service's chain: round robin over its active backends.
fn numgen(s: &ServiceLb, active: &[Ipv4Addr]) -> String {
    let arms: Vec<String> = active.iter().enumerate().map(|(i, ip)| format!("{i} : goto {}", be_chain(s.vip, *ip))).collect();
    format!("numgen inc mod {} vmap {{ {} }}", active.len(), arms.join(", "))
}

/// The whole table of one namespace, replacing what was there in one transaction.
fn full_table(services: &[&ServiceLb]) -> (String, BTreeMap<Ipv4Addr, NsVip>) {
    let mut made = BTreeMap::new();
    let mut t = format!("table {TABLE} {{}}\ndelete table {TABLE}\ntable {TABLE} {{\n");
    let mut vips = Vec::new();
    let mut refused = Vec::new();
    for s in services {
        let act = active(s);
        let _ = writeln!(t, "  chain {} {{ }}", vip_chain(s.vip, s.vni));
        for b in &s.backends {
            let _ = writeln!(t, "  chain {} {{ counter dnat to {}; }}", be_chain(s.vip, b.ip), b.ip);
        }
        if act.is_empty() {
            refused.push(s.vip.to_string());
        } else {
            let _ = writeln!(t, "  chain {} {{ {}; }}", svc_chain(s.vip), numgen(s, &act));
            vips.push(format!("{} : goto {}", s.vip, svc_chain(s.vip)));
        }
        made.insert(s.vip, NsVip { backends: s.backends.iter().map(|b| b.ip).collect(), active: !act.is_empty(), vni: Some(s.vni) });
    }
    let elements = |v: &[String]| if v.is_empty() { String::new() } else { format!(" elements = {{ {} }};", v.join(", ")) };
    let _ = writeln!(t, "  map vips {{ type ipv4_addr : verdict;{} }}", elements(&vips));
    let _ = writeln!(t, "  set refused {{ type ipv4_addr;{} }}", elements(&refused));
    t.push_str("  chain out { type nat hook output priority -100; policy accept; ip daddr vmap @vips; }\n");
    t.push_str("  chain filter_out { type filter hook output priority filter; policy accept; ct state invalid drop; ct state new ip daddr @refused meta l4proto tcp reject with tcp reset; ct state new ip daddr @refused reject; }\n");
    t.push_str("  chain filter_in { type filter hook input priority filter; policy accept; ct state invalid drop; }\n");
    t.push_str("}\n");
    (t, made)
}

/// The changes that make one namespace's table hold `s` (or, with None, no longer hold
/// `vip`), given what it holds; and the backends that left.
fn change(vip: Ipv4Addr, s: Option<&ServiceLb>, had: Option<&NsVip>) -> (String, Option<NsVip>, Vec<Ipv4Addr>) {
    let mut t = String::new();
    let old = had.cloned().unwrap_or_default();
    let existed = had.is_some();
    let want: BTreeSet<Ipv4Addr> = s.map(|s| s.backends.iter().map(|b| b.ip).collect()).unwrap_or_default();
    let act = s.map(active).unwrap_or_default();
    for ip in want.difference(&old.backends) {
        let c = be_chain(vip, *ip);
        let _ = writeln!(t, "add chain {TABLE} {c}\nadd rule {TABLE} {c} counter dnat to {ip}");
    }
    let sc = svc_chain(vip);
    if let (Some(s), false) = (s, existed) {
        let _ = writeln!(t, "add chain {TABLE} {}", vip_chain(vip, s.vni));
    }
    match s {
        Some(s) if !act.is_empty() => {
            let _ = writeln!(t, "add chain {TABLE} {sc}\nflush chain {TABLE} {sc}\nadd rule {TABLE} {sc} {}", numgen(s, &act));
            if !(existed && old.active) {
                if existed {
                    let _ = writeln!(t, "delete element {TABLE} refused {{ {vip} }}");
                }
                let _ = writeln!(t, "add element {TABLE} vips {{ {vip} : goto {sc} }}");
            }
        }
        Some(_) => {
            if existed && old.active {
                let _ = writeln!(t, "delete element {TABLE} vips {{ {vip} }}\ndelete chain {TABLE} {sc}");
            }
            if !existed || old.active {
                let _ = writeln!(t, "add element {TABLE} refused {{ {vip} }}");
            }
        }
        None => {
            if existed && old.active {
                let _ = writeln!(t, "delete element {TABLE} vips {{ {vip} }}\ndelete chain {TABLE} {sc}");
            } else if existed {
                let _ = writeln!(t, "delete element {TABLE} refused {{ {vip} }}");
            }
        }
    }
    if let (None, true, Some(vni)) = (s, existed, old.vni) {
        let _ = writeln!(t, "delete chain {TABLE} {}", vip_chain(vip, vni));
    }
    let gone: Vec<Ipv4Addr> = old.backends.difference(&want).copied().collect();
    for ip in &gone {
        let c = be_chain(vip, *ip);
        let _ = writeln!(t, "flush chain {TABLE} {c}\ndelete chain {TABLE} {c}");
    }
    let now = s.map(|s| NsVip { backends: want, active: !act.is_empty(), vni: Some(s.vni) });
    (t, now, gone)
}

impl NftLb {
    /// Checks that `nft` runs.
    pub fn open(ns: NsWorker) -> Result<NftLb, String> {
        let out = std::process::Command::new("nft").arg("--version").output().map_err(|e| format!("nft: {e} (install nftables)"))?;
        if !out.status.success() {
            return Err(format!("nft --version failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(NftLb { ns, state: Mutex::new(State::default()) })
    }

    /// The namespace's table, read back; None if it has none.
    async fn read_ns(&self, netns: &File) -> Result<Option<Table>, SinkError> {
        let f = netns.try_clone()?;
        let argv = vec!["nft".to_string(), "-j".into(), "list".into(), "table".into(), "ip".into(), "swarmnet".into()];
        let out = self.ns.run(move |ctx| ctx.command_in(&f, &argv, b"")).await??;
        if !out.status.success() {
            return Ok(None);
        }
        Ok(Some(parse_table(&out.stdout)?))
    }

    async fn nft(&self, netns: &File, script: String) -> Result<(), SinkError> {
        if script.is_empty() {
            return Ok(());
        }
        let f = netns.try_clone()?;
        let argv = vec!["nft".to_string(), "-f".into(), "-".into()];
        let out = self.ns.run(move |ctx| ctx.command_in(&f, &argv, script.as_bytes())).await??;
        if !out.status.success() {
            return Err(format!("nft -f: {}", String::from_utf8_lossy(&out.stderr).trim()).into());
        }
        Ok(())
    }

    /// Forgets UDP flows from this namespace to `vip` answered by `ip`, so the next datagram
    /// is steered again (to a task that is there).
    async fn clear_udp(&self, netns: &File, vip: Ipv4Addr, ip: Ipv4Addr) {
        let Ok(f) = netns.try_clone() else { return };
        let argv: Vec<String> = ["conntrack", "-D", "-p", "udp", "--orig-dst", &vip.to_string(), "--reply-src", &ip.to_string()].iter().map(|s| s.to_string()).collect();
        let r = match self.ns.run(move |ctx| ctx.command_in(&f, &argv, b"")).await {
            Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = r {
            warn!(vip = %vip, backend = %ip, error = %e, "load balancer (nftables): could not clear UDP flows");
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
            let mut script = String::new();
            let mut after = Vec::new();
            for (vip, s) in changes {
                // A VIP is on a namespace's networks, or held by it already (a removal).
                let concerned = match s {
                    Some(s) => t.vnis.contains(&s.vni),
                    None => t.made.contains_key(vip),
                };
                if !concerned {
                    continue;
                }
                let (text, now, gone) = change(*vip, *s, t.made.get(vip));
                script.push_str(&text);
                after.push((*vip, now, gone));
            }
            if after.is_empty() {
                continue;
            }
            let Ok(netns) = t.netns.try_clone() else { continue };
            match self.nft(&netns, script).await {
                Ok(()) => {
                    for (vip, now, gone) in after {
                        if let Some(t) = st.tasks.get_mut(&id) {
                            match now {
                                Some(n) => t.made.insert(vip, n),
                                None => t.made.remove(&vip),
                            };
                        }
                        for ip in gone {
                            self.clear_udp(&netns, vip, ip).await;
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
        svcs.iter()
            .map(|s| match failed.get(&s.vip) {
                Some(why) => Err(why.join("; ").into()),
                None => {
                    st.services.insert(s.vip, s.clone());
                    Ok(())
                }
            })
            .collect()
    }

    async fn remove(&self, vips: &[Ipv4Addr]) -> Vec<Result<(), SinkError>> {
        let mut st = self.state.lock().await;
        // Also VIPs this agent never programmed (an earlier agent's, left in an adopted
        // task's table): every namespace that holds one loses it.
        let changes: Vec<(Ipv4Addr, Option<&ServiceLb>)> = vips.iter().map(|v| (*v, None)).collect();
        let failed = self.apply(&mut st, &changes).await;
        vips.iter()
            .map(|v| match failed.get(v) {
                Some(why) => Err(why.join("; ").into()),
                None => {
                    st.services.remove(v);
                    Ok(())
                }
            })
            .collect()
    }

    /// Every VIP the tasks' tables hold, read back from the kernel: its backends (in the
    /// rotation: active, else draining) and the connections handed to each, summed over
    /// the namespaces of this node's tasks (and those gone since this agent started).
    async fn read(&self) -> Result<Vec<ServiceRow>, SinkError> {
        let st = self.state.lock().await;
        let mut rows: BTreeMap<Ipv4Addr, TableVip> = BTreeMap::new();
        for t in st.tasks.values() {
            let Some(table) = self.read_ns(&t.netns).await? else { continue };
            for (vip, v) in table.vips {
                let row = rows.entry(vip).or_insert_with(|| TableVip { vni: v.vni, ..Default::default() });
                for (ip, c) in v.backends {
                    let b = row.backends.entry(ip).or_default();
                    b.rotating |= c.rotating;
                    b.packets += c.packets;
                }
            }
        }
        Ok(rows
            .into_iter()
            .map(|(vip, v)| ServiceRow {
                vip,
                vni: v.vni,
                backends: v
                    .backends
                    .into_iter()
                    .map(|(ip, c)| BackendRow {
                        ip,
                        state: if c.rotating { BackendState::Active } else { BackendState::Draining },
                        connections: c.packets + st.retired.get(&(vip, ip)).copied().unwrap_or(0),
                    })
                    .collect(),
            })
            .collect())
    }

    async fn add_task(&self, task: &TaskId, netns: &File, vnis: &[u32]) -> Result<(), SinkError> {
        let mut st = self.state.lock().await;
        let mine: Vec<&ServiceLb> = st.services.values().filter(|s| vnis.contains(&s.vni)).collect();
        let made = match self.read_ns(netns).await? {
            // A task adopted after a restart: its table goes on as it is; what this agent
            // already programmed since is brought into it (one transaction), and the rest
            // changes from what it holds.
            Some(table) => {
                let mut made: BTreeMap<Ipv4Addr, NsVip> =
                    table.vips.into_iter().map(|(vip, v)| (vip, NsVip { backends: v.backends.keys().copied().collect(), active: v.in_map, vni: Some(v.vni) })).collect();
                let mut script = String::new();
                let mut after = Vec::new();
                for s in &mine {
                    let (text, now, _) = change(s.vip, Some(s), made.get(&s.vip));
                    script.push_str(&text);
                    after.push((s.vip, now));
                }
                self.nft(netns, script).await.map_err(|e| format!("task {task}: {e}"))?;
                for (vip, now) in after {
                    if let Some(n) = now {
                        made.insert(vip, n);
                    }
                }
                made
            }
            None => {
                let (script, made) = full_table(&mine);
                self.nft(netns, script).await.map_err(|e| format!("task {task}: {e}"))?;
                made
            }
        };
        st.tasks.insert(task.clone(), TaskNs { netns: netns.try_clone()?, vnis: vnis.to_vec(), made });
        Ok(())
    }

    async fn remove_task(&self, task: &TaskId, netns: Option<&File>, _vnis: &[u32]) -> Result<(), SinkError> {
        let mut st = self.state.lock().await;
        // The table goes with the namespace; its counters are kept for `lb ls`.
        let ns = match (st.tasks.remove(task), netns) {
            (Some(t), _) => Some(t.netns),
            (None, Some(f)) => Some(f.try_clone()?),
            (None, None) => None,
        };
        if let Some(ns) = ns {
            if let Ok(Some(table)) = self.read_ns(&ns).await {
                for (vip, v) in table.vips {
                    for (ip, c) in v.backends {
                        *st.retired.entry((vip, ip)).or_default() += c.packets;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::BackendLb;

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
        let (t, made) = full_table(&[&a]);
        assert!(t.starts_with("table ip swarmnet {}\ndelete table ip swarmnet\ntable ip swarmnet {\n"), "{t}");
        assert!(t.contains("chain b_0a000002_0a000003 { counter dnat to 10.0.0.3; }"), "{t}");
        assert!(t.contains("chain b_0a000002_0a000004 { counter dnat to 10.0.0.4; }"), "a draining backend keeps its chain: {t}");
        assert!(t.contains("chain s_0a000002 { numgen inc mod 1 vmap { 0 : goto b_0a000002_0a000003 }; }"), "only active ones are chosen: {t}");
        assert!(t.contains("elements = { 10.0.0.2 : goto s_0a000002 }"), "{t}");
        assert!(t.contains("ct state invalid drop"), "{t}");
        assert!(made[&a.vip].active);
    }

    #[test]
    fn changes_are_incremental_and_a_vip_without_tasks_is_refused() {
        let vip = Ipv4Addr::new(10, 0, 0, 2);
        let one = svc(&[(3, Active)]);
        let (t, now, gone) = change(vip, Some(&one), None);
        assert_eq!(t, "add chain ip swarmnet b_0a000002_0a000003\nadd rule ip swarmnet b_0a000002_0a000003 counter dnat to 10.0.0.3\nadd chain ip swarmnet v_0a000002_4096\nadd chain ip swarmnet s_0a000002\nflush chain ip swarmnet s_0a000002\nadd rule ip swarmnet s_0a000002 numgen inc mod 1 vmap { 0 : goto b_0a000002_0a000003 }\nadd element ip swarmnet vips { 10.0.0.2 : goto s_0a000002 }\n");
        assert!(gone.is_empty());
        let had = now.expect("held");
        // .3 drains, .4 arrives: .3's chain stays (its counter too), the rotation is .4 only.
        let two = svc(&[(3, Draining), (4, Active)]);
        let (t, now, gone) = change(vip, Some(&two), Some(&had));
        assert!(!t.contains("delete chain ip swarmnet b_0a000002_0a000003"), "{t}");
        assert!(t.contains("numgen inc mod 1 vmap { 0 : goto b_0a000002_0a000004 }"), "{t}");
        assert!(!t.contains("add element"), "already in the map: {t}");
        assert!(gone.is_empty());
        // Nobody active: out of the map, into the refused set; .3 left entirely.
        let had = now.expect("held");
        let none = svc(&[(4, Draining)]);
        let (t, now, gone) = change(vip, Some(&none), Some(&had));
        assert!(t.contains("delete element ip swarmnet vips { 10.0.0.2 }") && t.contains("add element ip swarmnet refused { 10.0.0.2 }"), "{t}");
        assert!(t.contains("flush chain ip swarmnet b_0a000002_0a000003\ndelete chain ip swarmnet b_0a000002_0a000003"), "{t}");
        assert_eq!(gone, vec![Ipv4Addr::new(10, 0, 0, 3)]);
        // Removed: out of the refused set, chains gone.
        let (t, now, _) = change(vip, None, now.as_ref());
        assert!(t.contains("delete element ip swarmnet refused { 10.0.0.2 }") && t.contains("delete chain ip swarmnet b_0a000002_0a000004"), "{t}");
        assert!(t.contains("delete chain ip swarmnet v_0a000002_4096"), "{t}");
        assert!(now.is_none());
    }

    #[test]
    fn a_table_read_back_says_what_it_holds() {
        let json = br#"{"nftables": [{"metainfo": {}}, {"table": {"family": "ip", "name": "swarmnet"}},
          {"map": {"name": "vips", "elem": [["10.0.0.2", {"goto": {"target": "s_0a000002"}}]]}},
          {"set": {"name": "refused", "elem": ["10.0.0.9"]}},
          {"chain": {"name": "v_0a000002_4096"}}, {"chain": {"name": "v_0a000009_4096"}},
          {"rule": {"chain": "b_0a000002_0a000003", "expr": [{"counter": {"packets": 7, "bytes": 420}}, {"dnat": {"addr": "10.0.0.3"}}]}},
          {"rule": {"chain": "b_0a000002_0a000004", "expr": [{"counter": {"packets": 2, "bytes": 120}}, {"dnat": {"addr": "10.0.0.4"}}]}},
          {"rule": {"chain": "s_0a000002", "expr": [{"vmap": {"key": {"numgen": {"mode": "inc", "mod": 1}}, "data": {"set": [[0, {"goto": {"target": "b_0a000002_0a000003"}}]]}}}]}}]}"#;
        let t = parse_table(json).expect("parse");
        let web = &t.vips[&Ipv4Addr::new(10, 0, 0, 2)];
        assert_eq!((web.vni, web.in_map), (4096, true));
        assert_eq!(web.backends[&Ipv4Addr::new(10, 0, 0, 3)], Chain { rotating: true, packets: 7 }, "in the rotation, 7 connections");
        assert_eq!(web.backends[&Ipv4Addr::new(10, 0, 0, 4)], Chain { rotating: false, packets: 2 }, "draining, 2 connections");
        let empty = &t.vips[&Ipv4Addr::new(10, 0, 0, 9)];
        assert_eq!((empty.vni, empty.in_map, empty.backends.len()), (4096, false, 0), "refused");
    }

    #[test]
    fn backend_chains_name_their_vip_and_address() {
        assert_eq!(parse_be_chain("b_0a000002_0a000003"), Some((Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3))));
        assert_eq!(parse_be_chain("s_0a000002"), None);
    }
}
