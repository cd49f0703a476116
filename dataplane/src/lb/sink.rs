//! The load balancer's sink of the endpoint stream, and its second input: the VIPs the
//! manager allocated (a service scaled to 0 has no endpoint, yet its VIP must refuse at once).
//!
//! Per VIP the backend set is: every endpoint of the VIP's network that carries that VIP,
//! active or draining. Until a network has had a complete resync (after a restart, while
//! the table refills), backends that an earlier agent programmed and that the table has not
//! spoken of are kept, so a restart never takes a live task out of rotation.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use swarmnet_types::{Change, Endpoint, EndpointState, NetworkId, Resync, Sink, SinkError, TaskId};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::{BackendLb, BackendState, LbBackend, ServiceLb, ServiceRow};

/// A VIP as the manager allocated it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct VipInfo {
    pub network: NetworkId,
    pub vip: Ipv4Addr,
    pub service: String,
}

/// What `lb ls` adds to the kernel's table.
pub struct Names {
    pub services: BTreeMap<Ipv4Addr, String>,
    pub tasks: BTreeMap<Ipv4Addr, String>,
    pub failed: BTreeMap<Ipv4Addr, String>,
}

/// The VNI of a network the node is on (the gate of its VIPs), None if it is not on it.
pub type VniOf = Arc<dyn Fn(&NetworkId) -> Option<u32> + Send + Sync>;

struct Core {
    backend: Arc<dyn LbBackend>,
    vni_of: VniOf,
    /// The endpoint table of the networks the node is on.
    eps: BTreeMap<NetworkId, BTreeMap<TaskId, Arc<Endpoint>>>,
    /// VIPs from the manager.
    vips: BTreeMap<Ipv4Addr, VipInfo>,
    /// What is programmed, per VIP.
    programmed: BTreeMap<Ipv4Addr, ServiceLb>,
    /// Networks resynced completely since this agent started.
    complete: BTreeSet<NetworkId>,
    /// What an earlier agent left in the kernel (read once), per VIP; dropped per network at
    /// its complete resync, per backend when the table says it went away.
    adopted: Option<BTreeMap<Ipv4Addr, ServiceRow>>,
    /// VIPs whose last programming failed, and why (`lb ls` shows it; the follow loop
    /// retries).
    failed: BTreeMap<Ipv4Addr, String>,
    /// Networks resynced at least once (partially or completely) since this agent started.
    /// VIPs of a network not resynced yet are left as they are: before it, this agent knows
    /// neither the network's endpoints nor what an earlier agent left for it (the nftables
    /// backend reads that from the namespaces of tasks as they are adopted).
    seen: BTreeSet<NetworkId>,
}

/// The load balancer's state, shared by its sink (in the follow loop) and its handle (the
/// session's VIP list, `lb ls`).
#[derive(Clone)]
pub struct LbSink {
    core: Arc<Mutex<Core>>,
}

fn state_of(e: &Endpoint) -> BackendState {
    match e.state {
        EndpointState::Active => BackendState::Active,
        EndpointState::Draining => BackendState::Draining,
    }
}

impl Core {
    async fn adopted(&mut self) -> &mut BTreeMap<Ipv4Addr, ServiceRow> {
        if self.adopted.is_none() {
            let rows = match self.backend.read().await {
                Ok(rows) => rows,
                Err(e) => {
                    warn!(error = %e, "load balancer: cannot read what an earlier agent left; starting from nothing");
                    Vec::new()
                }
            };
            if !rows.is_empty() {
                info!(vips = rows.len(), "load balancer: adopted the VIPs an earlier agent programmed");
            }
            self.adopted = Some(rows.into_iter().map(|r| (r.vip, r)).collect());
        }
        self.adopted.get_or_insert_with(BTreeMap::new)
    }

    /// Adds what the backend holds now for `network` (its VNI) to what an earlier agent left,
    /// for VIPs not known yet.
    async fn refresh_adopted(&mut self, network: &NetworkId) {
        let Some(vni) = (self.vni_of)(network) else { return };
        let Ok(rows) = self.backend.read().await else { return };
        let programmed: BTreeSet<Ipv4Addr> = self.programmed.keys().copied().collect();
        let a = self.adopted().await;
        for r in rows.into_iter().filter(|r| r.vni == vni && !programmed.contains(&r.vip)) {
            a.entry(r.vip).or_insert(r);
        }
    }

    /// The network a VIP belongs to: the manager's word, else its endpoints'.
    fn network_of(&self, vip: Ipv4Addr) -> Option<NetworkId> {
        if let Some(i) = self.vips.get(&vip) {
            return Some(i.network.clone());
        }
        self.eps.iter().find(|(_, m)| m.values().any(|e| e.vip == Some(vip))).map(|(n, _)| n.clone())
    }

    /// `hint`: the network being resynced (the only way to place a VIP that only an earlier
    /// agent's kernel state still knows).
    async fn desired(&mut self, vip: Ipv4Addr, hint: Option<&NetworkId>) -> Option<ServiceLb> {
        let network = match self.network_of(vip) {
            Some(n) => n,
            None => {
                let n = hint?;
                let vni = (self.vni_of)(n)?;
                self.adopted().await.get(&vip).filter(|r| r.vni == vni)?;
                n.clone()
            }
        };
        let vni = (self.vni_of)(&network)?;
        let eps: Vec<&Endpoint> = self.eps.get(&network).map(|m| m.values().filter(|e| e.vip == Some(vip)).map(|e| &**e).collect()).unwrap_or_default();
        let service = self.vips.get(&vip).map(|i| i.service.clone()).or_else(|| eps.first().map(|e| e.service_name.clone())).unwrap_or_default();
        let mut backends: Vec<BackendLb> = eps.iter().map(|e| BackendLb { task: e.id.clone(), ip: e.ip, state: state_of(e) }).collect();
        let mut known = !backends.is_empty() || self.vips.contains_key(&vip);
        if !self.complete.contains(&network) {
            let ips: BTreeSet<Ipv4Addr> = backends.iter().map(|b| b.ip).collect();
            if let Some(row) = self.adopted().await.get(&vip) {
                // Left by an earlier agent (a service scaled to 0 included): kept until the
                // network's table is complete.
                known = true;
                for b in row.backends.iter().filter(|b| !ips.contains(&b.ip)) {
                    backends.push(BackendLb { task: format!("adopted:{}", b.ip), ip: b.ip, state: b.state });
                }
            }
        }
        if !known && backends.is_empty() {
            return None;
        }
        backends.sort();
        Some(ServiceLb { vip, network, vni, service, backends })
    }

    /// Makes the kernel hold what is desired for each of `vips` (of `network`, if known):
    /// one batch of services to set and one of VIPs to remove.
    async fn program(&mut self, vips: BTreeSet<Ipv4Addr>, network: Option<&NetworkId>) -> Result<(), SinkError> {
        let mut sets = Vec::new();
        let mut removes = Vec::new();
        for vip in vips {
            if self.network_of(vip).or_else(|| network.cloned()).is_some_and(|n| !self.seen.contains(&n)) {
                continue;
            }
            let want = self.desired(vip, network).await;
            if want.as_ref() == self.programmed.get(&vip) {
                continue;
            }
            match want {
                Some(s) => sets.push(s),
                None => removes.push(vip),
            }
        }
        let mut failed = Vec::new();
        if !sets.is_empty() {
            let results = self.backend.set(&sets).await;
            for (s, r) in sets.into_iter().zip(results) {
                match r {
                    Ok(()) => {
                        debug!(vip = %s.vip, service = %s.service, backends = s.backends.len(), "load balancer: VIP programmed");
                        self.failed.remove(&s.vip);
                        self.programmed.insert(s.vip, s);
                    }
                    Err(e) => {
                        failed.push(format!("vip {}: {e}", s.vip));
                        self.failed.insert(s.vip, e.to_string());
                    }
                }
            }
        }
        if !removes.is_empty() {
            let results = self.backend.remove(&removes).await;
            for (vip, r) in removes.into_iter().zip(results) {
                match r {
                    Ok(()) => {
                        debug!(vip = %vip, "load balancer: VIP removed");
                        self.failed.remove(&vip);
                        self.programmed.remove(&vip);
                        if let Some(a) = self.adopted.as_mut() {
                            a.remove(&vip);
                        }
                    }
                    Err(e) => {
                        failed.push(format!("vip {vip}: {e}"));
                        self.failed.insert(vip, e.to_string());
                    }
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; ").into())
        }
    }

    /// Every VIP that concerns `network`: programmed, allocated, on an endpoint, or left by
    /// an earlier agent with its VNI.
    async fn vips_of(&mut self, network: &NetworkId) -> BTreeSet<Ipv4Addr> {
        let mut out: BTreeSet<Ipv4Addr> = self.programmed.values().filter(|s| &s.network == network).map(|s| s.vip).collect();
        out.extend(self.vips.values().filter(|i| &i.network == network).map(|i| i.vip));
        out.extend(self.eps.get(network).into_iter().flat_map(|m| m.values().filter_map(|e| e.vip)));
        if let Some(vni) = (self.vni_of)(network) {
            out.extend(self.adopted().await.values().filter(|r| r.vni == vni).map(|r| r.vip));
        }
        out
    }
}

impl LbSink {
    pub fn new(backend: Arc<dyn LbBackend>, vni_of: VniOf) -> LbSink {
        let core = Core {
            backend,
            vni_of,
            eps: BTreeMap::new(),
            vips: BTreeMap::new(),
            programmed: BTreeMap::new(),
            complete: BTreeSet::new(),
            adopted: None,
            failed: BTreeMap::new(),
            seen: BTreeSet::new(),
        };
        LbSink { core: Arc::new(Mutex::new(core)) }
    }

    /// The VIPs the manager allocated, all of them (replaces the previous list).
    pub async fn set_vips(&self, vips: Vec<VipInfo>) -> Result<(), SinkError> {
        let mut c = self.core.lock().await;
        let new: BTreeMap<Ipv4Addr, VipInfo> = vips.into_iter().map(|v| (v.vip, v)).collect();
        if new == c.vips {
            return Ok(());
        }
        let mut touched: BTreeSet<Ipv4Addr> = c.vips.keys().copied().collect();
        touched.extend(new.keys().copied());
        c.vips = new;
        c.program(touched, None).await
    }

    /// For `lb ls`: the service name of each VIP, the task of each backend address, and the
    /// VIPs whose programming failed (with why).
    pub async fn names(&self) -> Names {
        let c = self.core.lock().await;
        let mut services: BTreeMap<Ipv4Addr, String> = c.vips.values().map(|v| (v.vip, v.service.clone())).collect();
        services.extend(c.programmed.values().map(|s| (s.vip, s.service.clone())));
        let tasks = c.eps.values().flat_map(|m| m.values()).map(|e| (e.ip, e.task_name.clone())).collect();
        Names { services, tasks, failed: c.failed.clone() }
    }

    pub async fn backend(&self) -> Arc<dyn LbBackend> {
        self.core.lock().await.backend.clone()
    }
}

#[async_trait::async_trait]
impl Sink for LbSink {
    fn name(&self) -> &'static str {
        "lb"
    }

    async fn apply(&mut self, changes: &[Change]) -> Result<(), SinkError> {
        let mut c = self.core.lock().await;
        let mut touched = BTreeSet::new();
        for ch in changes {
            let net = c.eps.entry(ch.network.clone()).or_default();
            match &ch.new {
                Some(e) => net.insert(ch.id.clone(), e.clone()),
                None => net.remove(&ch.id),
            };
            for e in ch.old.iter().chain(ch.new.iter()) {
                if let Some(v) = e.vip {
                    touched.insert(v);
                }
            }
            // The table says this task went away: an earlier agent's copy of it goes too.
            if let (Some(old), None) = (&ch.old, &ch.new) {
                if let (Some(v), Some(a)) = (old.vip, c.adopted.as_mut()) {
                    if let Some(row) = a.get_mut(&v) {
                        row.backends.retain(|b| b.ip != old.ip);
                    }
                }
            }
        }
        c.program(touched, None).await
    }

    async fn resync(&mut self, network: &NetworkId, endpoints: &[Arc<Endpoint>], how: Resync) -> Result<(), SinkError> {
        let mut c = self.core.lock().await;
        let eps: BTreeMap<TaskId, Arc<Endpoint>> = endpoints.iter().map(|e| (e.id.clone(), e.clone())).collect();
        c.seen.insert(network.clone());
        match how {
            Resync::Complete => {
                c.eps.insert(network.clone(), eps);
                c.complete.insert(network.clone());
            }
            Resync::Partial => c.eps.entry(network.clone()).or_default().extend(eps),
        }
        if how == Resync::Partial {
            // What an earlier agent left may have become readable since the first look (the
            // nftables backend reads it from task namespaces, added one by one as tasks are
            // adopted): look again while the network's table is still filling.
            c.refresh_adopted(network).await;
        }
        let touched = c.vips_of(network).await;
        let r = c.program(touched, Some(network)).await;
        if how == Resync::Complete {
            let failed: BTreeSet<Ipv4Addr> = c.failed.keys().copied().collect();
            if let (Some(vni), Some(a)) = ((c.vni_of)(network), c.adopted.as_mut()) {
                // What could not be removed stays known, for the retry.
                a.retain(|vip, row| row.vni != vni || failed.contains(vip));
            }
        }
        r
    }

    async fn forget(&mut self, network: &NetworkId) -> Result<(), SinkError> {
        let mut c = self.core.lock().await;
        c.eps.remove(network);
        c.complete.remove(network);
        c.seen.remove(network);
        let mine: Vec<Ipv4Addr> = c.programmed.values().filter(|s| &s.network == network).map(|s| s.vip).collect();
        let mut failed = Vec::new();
        let results = c.backend.remove(&mine).await;
        for (vip, r) in mine.into_iter().zip(results) {
            match r {
                Ok(()) => {
                    c.programmed.remove(&vip);
                }
                Err(e) => failed.push(format!("vip {vip}: {e}")),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; ").into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::net::IpAddr;
    use std::sync::Mutex as StdMutex;

    use crate::lb::{BackendRow, Kind};

    /// A kernel in memory that records every call.
    #[derive(Default)]
    struct Fake {
        table: StdMutex<BTreeMap<Ipv4Addr, ServiceLb>>,
        left: StdMutex<Vec<ServiceRow>>,
        calls: StdMutex<Vec<String>>,
        full: StdMutex<bool>,
    }

    #[async_trait::async_trait]
    impl LbBackend for Fake {
        fn kind(&self) -> Kind {
            Kind::Ebpf
        }
        async fn set(&self, svcs: &[ServiceLb]) -> Vec<Result<(), SinkError>> {
            svcs.iter()
                .map(|svc| {
                    let b: Vec<String> = svc.backends.iter().map(|b| format!("{}{}", b.ip, if b.state == BackendState::Draining { "(d)" } else { "" })).collect();
                    self.calls.lock().expect("lock").push(format!("set {} [{}]", svc.vip, b.join(" ")));
                    if *self.full.lock().expect("lock") {
                        return Err(format!("vip {}: map SN_SLOTS: write slot 0: no space left", svc.vip).into());
                    }
                    self.table.lock().expect("lock").insert(svc.vip, svc.clone());
                    Ok(())
                })
                .collect()
        }
        async fn remove(&self, vips: &[Ipv4Addr]) -> Vec<Result<(), SinkError>> {
            vips.iter()
                .map(|vip| {
                    self.calls.lock().expect("lock").push(format!("remove {vip}"));
                    self.table.lock().expect("lock").remove(vip);
                    Ok(())
                })
                .collect()
        }
        async fn read(&self) -> Result<Vec<ServiceRow>, SinkError> {
            Ok(self.left.lock().expect("lock").clone())
        }
        async fn add_task(&self, _: &TaskId, _: &File, _: &[u32]) -> Result<(), SinkError> {
            Ok(())
        }
        async fn remove_task(&self, _: &TaskId, _: Option<&File>, _: &[u32]) -> Result<(), SinkError> {
            Ok(())
        }
    }

    impl Fake {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().expect("lock"))
        }
    }

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn ep(id: &str, last: u8, state: EndpointState) -> Endpoint {
        Endpoint {
            network: "n".into(),
            id: id.into(),
            task_name: format!("web.{last}"),
            service_name: "web".into(),
            service_id: "s".into(),
            aliases: vec![],
            ip: Ipv4Addr::new(10, 0, 0, last),
            mac: [2, 0x42, 10, 0, 0, last],
            vtep: IpAddr::V4(Ipv4Addr::new(10, 210, 0, 2)),
            vip: Some(VIP),
            ports: vec![],
            state,
        }
    }

    fn add(e: &Endpoint) -> Change {
        Change { network: e.network.clone(), id: e.id.clone(), old: None, new: Some(Arc::new(e.clone())) }
    }

    fn del(e: &Endpoint) -> Change {
        Change { network: e.network.clone(), id: e.id.clone(), old: Some(Arc::new(e.clone())), new: None }
    }

    fn setup() -> (Arc<Fake>, LbSink) {
        let fake = Arc::new(Fake::default());
        let sink = LbSink::new(fake.clone(), Arc::new(|n: &NetworkId| (n == "n").then_some(4096)));
        (fake, sink)
    }

    /// The node joined network n (the follow loop's first resync of it).
    async fn joined(sink: &mut LbSink) {
        sink.resync(&"n".into(), &[], Resync::Partial).await.expect("join");
    }

    fn vip_info() -> VipInfo {
        VipInfo { network: "n".into(), vip: VIP, service: "web".into() }
    }

    #[tokio::test]
    async fn endpoints_become_one_backend_set_per_vip_with_their_state() {
        let (fake, mut sink) = setup();
        joined(&mut sink).await;
        let (a, b) = (ep("a", 3, EndpointState::Active), ep("b", 4, EndpointState::Active));
        sink.apply(&[add(&a), add(&b)]).await.expect("apply");
        assert_eq!(fake.take(), vec!["set 10.0.0.2 [10.0.0.3 10.0.0.4]"], "one step for the whole batch");
        let mut drained = b.clone();
        drained.state = EndpointState::Draining;
        sink.apply(&[Change { network: "n".into(), id: "b".into(), old: Some(Arc::new(b.clone())), new: Some(Arc::new(drained.clone())) }]).await.expect("apply");
        assert_eq!(fake.take(), vec!["set 10.0.0.2 [10.0.0.3 10.0.0.4(d)]"]);
        // Unrelated news changes nothing.
        let mut other = ep("c", 9, EndpointState::Active);
        other.vip = None;
        sink.apply(&[add(&other)]).await.expect("apply");
        assert!(fake.take().is_empty());
        sink.apply(&[del(&a), del(&drained)]).await.expect("apply");
        assert_eq!(fake.take(), vec!["remove 10.0.0.2"], "no endpoint and no allocated VIP: nothing to translate");
    }

    #[tokio::test]
    async fn an_allocated_vip_without_tasks_stays_programmed_empty_so_it_refuses() {
        let (fake, mut sink) = setup();
        joined(&mut sink).await;
        sink.set_vips(vec![vip_info()]).await.expect("vips");
        assert_eq!(fake.take(), vec!["set 10.0.0.2 []"]);
        let a = ep("a", 3, EndpointState::Active);
        sink.apply(&[add(&a)]).await.expect("apply");
        sink.apply(&[del(&a)]).await.expect("apply");
        assert_eq!(fake.take(), vec!["set 10.0.0.2 [10.0.0.3]", "set 10.0.0.2 []"]);
        sink.set_vips(vec![]).await.expect("vips");
        assert_eq!(fake.take(), vec!["remove 10.0.0.2"], "the service is gone");
        // A VIP of a network the node is not on is not programmed.
        sink.set_vips(vec![VipInfo { network: "elsewhere".into(), vip: Ipv4Addr::new(10, 9, 0, 2), service: "x".into() }]).await.expect("vips");
        assert!(fake.take().is_empty());
    }

    #[tokio::test]
    async fn after_a_restart_backends_left_in_the_kernel_stay_until_the_table_says_otherwise() {
        let (fake, mut sink) = setup();
        let left = |ip: u8| BackendRow { ip: Ipv4Addr::new(10, 0, 0, ip), state: BackendState::Active, connections: 7 };
        fake.left.lock().expect("lock").push(ServiceRow { vip: VIP, vni: 4096, backends: vec![left(3), left(4), left(5)] });
        // The table is filling: only .3 is known yet; .4 and .5 keep taking connections.
        sink.resync(&"n".into(), &[Arc::new(ep("a", 3, EndpointState::Active))], Resync::Partial).await.expect("partial");
        assert_eq!(fake.take(), vec!["set 10.0.0.2 [10.0.0.3 10.0.0.4 10.0.0.5]"]);
        // The table says .4's task went away.
        sink.apply(&[del(&ep("b", 4, EndpointState::Active))]).await.expect("apply");
        assert_eq!(fake.take(), vec!["set 10.0.0.2 [10.0.0.3 10.0.0.5]"]);
        // The complete resync: .5 was gone while the agent was down.
        sink.resync(&"n".into(), &[Arc::new(ep("a", 3, EndpointState::Active))], Resync::Complete).await.expect("complete");
        assert_eq!(fake.take(), vec!["set 10.0.0.2 [10.0.0.3]"]);
    }

    #[tokio::test]
    async fn a_vip_left_by_an_earlier_agent_that_no_longer_exists_is_removed_at_the_complete_resync() {
        let (fake, mut sink) = setup();
        let gone = Ipv4Addr::new(10, 0, 0, 9);
        fake.left.lock().expect("lock").push(ServiceRow { vip: gone, vni: 4096, backends: vec![] });
        fake.left.lock().expect("lock").push(ServiceRow { vip: Ipv4Addr::new(10, 7, 0, 2), vni: 5000, backends: vec![] });
        sink.resync(&"n".into(), &[], Resync::Partial).await.expect("partial");
        assert!(!fake.take().iter().any(|c| c.starts_with("remove")), "nothing is removed while the table fills");
        sink.resync(&"n".into(), &[], Resync::Complete).await.expect("complete");
        assert_eq!(fake.take(), vec!["remove 10.0.0.9"], "only the network resynced is swept");
    }

    #[tokio::test]
    async fn a_full_map_is_an_error_lb_ls_shows_and_the_old_set_stays() {
        let (fake, mut sink) = setup();
        joined(&mut sink).await;
        sink.apply(&[add(&ep("a", 3, EndpointState::Active))]).await.expect("apply");
        *fake.full.lock().expect("lock") = true;
        let e = sink.apply(&[add(&ep("b", 4, EndpointState::Active))]).await.expect_err("full");
        assert!(e.to_string().contains("no space left"), "{e}");
        let names = sink.names().await;
        assert!(names.failed.get(&VIP).is_some_and(|w| w.contains("no space left")), "lb ls shows why");
        assert_eq!(fake.table.lock().expect("lock")[&VIP].backends.len(), 1, "the old set stays live");
        *fake.full.lock().expect("lock") = false;
        sink.resync(&"n".into(), &[Arc::new(ep("a", 3, EndpointState::Active)), Arc::new(ep("b", 4, EndpointState::Active))], Resync::Complete).await.expect("retry");
        assert!(sink.names().await.failed.is_empty());
        assert_eq!(fake.table.lock().expect("lock")[&VIP].backends.len(), 2);
    }

    #[tokio::test]
    async fn nothing_is_programmed_for_a_network_before_its_first_resync() {
        let (fake, mut sink) = setup();
        sink.set_vips(vec![vip_info()]).await.expect("vips");
        sink.apply(&[add(&ep("a", 3, EndpointState::Active))]).await.expect("apply");
        assert!(fake.take().is_empty(), "what an earlier agent left may not be readable yet");
        joined(&mut sink).await;
        assert_eq!(fake.take(), vec!["set 10.0.0.2 [10.0.0.3]"]);
    }

    #[tokio::test]
    async fn leaving_a_network_removes_its_vips() {
        let (fake, mut sink) = setup();
        joined(&mut sink).await;
        sink.apply(&[add(&ep("a", 3, EndpointState::Active))]).await.expect("apply");
        fake.take();
        sink.forget(&"n".into()).await.expect("forget");
        assert_eq!(fake.take(), vec!["remove 10.0.0.2"]);
    }
}
