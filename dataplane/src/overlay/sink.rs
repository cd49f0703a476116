//! The overlay's sink of the endpoint stream: every remote endpoint of a network the node is
//! on becomes a permanent neighbour entry (IP → MAC) and an FDB entry (MAC → its node's
//! VTEP) in the network's sandbox. Local endpoints need neither (they are on `br0`).
//!
//! The sink keeps what should be (per network, endpoint id → remote) and asks its kernel to
//! make one network's entries match it, within a [`Scope`]: a batch of changes touches only
//! the addresses and MACs it spoke of (so an entry the table has not caught up with after a
//! restart is never removed by an unrelated change); a complete resync makes the whole
//! network match; a partial one only adds and corrects.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use swarmnet_types::{Change, Endpoint, NetworkId, Resync, Sink, SinkError, TaskId};
use tracing::debug;

use super::{Op, Remote, Scope};

/// Where the overlay's entries live. [`super::Sandboxes`] in the daemon; a table in memory
/// in tests.
#[async_trait::async_trait]
pub trait OverlayKernel: Send + Sync {
    /// Makes `network`'s entries match `desired` within `scope`; the operations carried
    /// out, or None if this node has no sandbox for the network (nothing to program).
    async fn sync(&self, network: &NetworkId, desired: Vec<Remote>, scope: Scope) -> Result<Option<Vec<Op>>, SinkError>;
}

#[async_trait::async_trait]
impl<K: OverlayKernel + ?Sized> OverlayKernel for std::sync::Arc<K> {
    async fn sync(&self, network: &NetworkId, desired: Vec<Remote>, scope: Scope) -> Result<Option<Vec<Op>>, SinkError> {
        (**self).sync(network, desired, scope).await
    }
}

pub struct OverlaySink<K> {
    kernel: K,
    /// This node's VTEP: its own endpoints are not remote.
    local: IpAddr,
    desired: BTreeMap<NetworkId, BTreeMap<TaskId, Remote>>,
    stats: std::sync::Arc<OverlayStats>,
}

/// What the overlay sink counts (`--metrics-addr`).
#[derive(Debug, Default)]
pub struct OverlayStats {
    /// Remote endpoints wanted in the kernel now (each one neighbour and one FDB entry), all
    /// networks.
    pub remotes: std::sync::atomic::AtomicU64,
    /// Networks with remote endpoints wanted.
    pub networks: std::sync::atomic::AtomicU64,
    /// Neighbour and FDB entries added, changed or removed.
    pub entry_changes: std::sync::atomic::AtomicU64,
    /// Kernel programming failures.
    pub failures: std::sync::atomic::AtomicU64,
    /// How long bringing one network's entries in line took (dump, plan, changes).
    pub sync_latency: swarmnet_types::metrics::Histogram,
}

impl<K: OverlayKernel> OverlaySink<K> {
    pub fn new(kernel: K, local: IpAddr) -> Self {
        OverlaySink { kernel, local, desired: BTreeMap::new(), stats: Default::default() }
    }

    /// Counts into `stats`.
    pub fn with_stats(mut self, stats: std::sync::Arc<OverlayStats>) -> Self {
        self.stats = stats;
        self
    }

    fn count_desired(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.remotes.store(self.desired.values().map(|m| m.len() as u64).sum(), Relaxed);
        self.stats.networks.store(self.desired.values().filter(|m| !m.is_empty()).count() as u64, Relaxed);
    }

    fn remote(&self, e: &Endpoint) -> Option<Remote> {
        match e.vtep {
            IpAddr::V4(v) if e.vtep != self.local => Some(Remote { ip: e.ip, mac: e.mac, vtep: v }),
            _ => None,
        }
    }

    async fn sync(&self, network: &NetworkId, scope: Scope) -> Result<(), SinkError> {
        use std::sync::atomic::Ordering::Relaxed;
        let desired: Vec<Remote> = self.desired.get(network).map(|m| m.values().copied().collect()).unwrap_or_default();
        self.count_desired();
        let started = std::time::Instant::now();
        let r = self.kernel.sync(network, desired, scope).await;
        self.stats.sync_latency.observe(started.elapsed());
        match r {
            Ok(Some(ops)) if !ops.is_empty() => {
                self.stats.entry_changes.fetch_add(ops.len() as u64, Relaxed);
                debug!(network = %network, changes = ops.len(), "overlay entries updated");
            }
            Ok(_) => {}
            Err(e) => {
                self.stats.failures.fetch_add(1, Relaxed);
                return Err(e);
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl<K: OverlayKernel> Sink for OverlaySink<K> {
    fn name(&self) -> &'static str {
        "overlay"
    }

    async fn apply(&mut self, changes: &[Change]) -> Result<(), SinkError> {
        let mut touched: BTreeMap<NetworkId, (BTreeSet<Ipv4Addr>, BTreeSet<[u8; 6]>)> = BTreeMap::new();
        for c in changes {
            let new = c.new.as_ref().and_then(|e| self.remote(e));
            let net = self.desired.entry(c.network.clone()).or_default();
            match new {
                Some(r) => net.insert(c.id.clone(), r),
                None => net.remove(&c.id),
            };
            let keys = touched.entry(c.network.clone()).or_default();
            for e in c.old.iter().chain(c.new.iter()) {
                keys.0.insert(e.ip);
                keys.1.insert(e.mac);
            }
        }
        let mut failed = Vec::new();
        for (network, (ips, macs)) in touched {
            if let Err(e) = self.sync(&network, Scope::Keys { ips, macs }).await {
                failed.push(format!("{e}"));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; ").into())
        }
    }

    async fn resync(&mut self, network: &NetworkId, endpoints: &[Arc<Endpoint>], how: Resync) -> Result<(), SinkError> {
        let remotes: BTreeMap<TaskId, Remote> = endpoints.iter().filter_map(|e| Some((e.id.clone(), self.remote(e)?))).collect();
        match how {
            Resync::Complete => {
                self.desired.insert(network.clone(), remotes);
            }
            Resync::Partial => self.desired.entry(network.clone()).or_default().extend(remotes),
        }
        self.sync(network, if how == Resync::Complete { Scope::All } else { Scope::AddOnly }).await
    }

    async fn forget(&mut self, network: &NetworkId) -> Result<(), SinkError> {
        self.desired.remove(network);
        self.count_desired();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use swarmnet_types::EndpointState;

    type Neigh = BTreeMap<Ipv4Addr, [u8; 6]>;
    type Fdb = BTreeMap<[u8; 6], Ipv4Addr>;

    /// A kernel in memory: per network with a sandbox, its neighbour and FDB tables, and a
    /// record of every operation.
    #[derive(Default)]
    struct FakeKernel {
        tables: Mutex<BTreeMap<NetworkId, (Neigh, Fdb)>>,
        ops: Mutex<Vec<(NetworkId, Op)>>,
        fail: Mutex<bool>,
    }

    #[async_trait::async_trait]
    impl OverlayKernel for FakeKernel {
        async fn sync(&self, network: &NetworkId, desired: Vec<Remote>, scope: Scope) -> Result<Option<Vec<Op>>, SinkError> {
            if *self.fail.lock().expect("lock") {
                return Err(format!("network {network}: netlink: no buffer space").into());
            }
            let mut tables = self.tables.lock().expect("lock");
            let Some((neigh, fdb)) = tables.get_mut(network) else { return Ok(None) };
            let n: Vec<_> = neigh.iter().map(|(k, v)| (*k, *v)).collect();
            let f: Vec<_> = fdb.iter().map(|(k, v)| (*k, *v)).collect();
            let ops = super::super::plan_scoped(&desired, &n, &f, &scope);
            for op in &ops {
                match *op {
                    Op::NeighAdd(ip, mac) => drop(neigh.insert(ip, mac)),
                    Op::NeighDel(ip) => drop(neigh.remove(&ip)),
                    Op::FdbAdd(mac, dst) => drop(fdb.insert(mac, dst)),
                    Op::FdbDel(mac, _) => drop(fdb.remove(&mac)),
                }
                self.ops.lock().expect("lock").push((network.clone(), *op));
            }
            Ok(Some(ops))
        }
    }

    impl FakeKernel {
        fn with_sandbox(net: &str) -> Arc<FakeKernel> {
            let k = FakeKernel::default();
            k.tables.lock().expect("lock").insert(net.into(), Default::default());
            Arc::new(k)
        }
        fn neigh(&self, net: &str) -> Vec<Ipv4Addr> {
            self.tables.lock().expect("lock").get(net).map(|t| t.0.keys().copied().collect()).unwrap_or_default()
        }
        fn fdb(&self, net: &str) -> Vec<([u8; 6], Ipv4Addr)> {
            self.tables.lock().expect("lock").get(net).map(|t| t.1.iter().map(|(k, v)| (*k, *v)).collect()).unwrap_or_default()
        }
    }

    const LOCAL: [u8; 4] = [10, 210, 0, 1];

    fn ep(net: &str, id: &str, last: u8, node: u8) -> Endpoint {
        Endpoint {
            network: net.into(),
            id: id.into(),
            task_name: format!("web.{last}"),
            service_name: "web".into(),
            service_id: "s".into(),
            aliases: vec![],
            ip: Ipv4Addr::new(10, 0, 0, last),
            mac: [2, 0x42, 10, 0, 0, last],
            vtep: IpAddr::V4(Ipv4Addr::new(10, 210, 0, node)),
            vip: None,
            ports: vec![],
            state: EndpointState::Active,
        }
    }

    fn add(e: &Endpoint) -> Change {
        Change { network: e.network.clone(), id: e.id.clone(), old: None, new: Some(Arc::new(e.clone())) }
    }

    fn del(e: &Endpoint) -> Change {
        Change { network: e.network.clone(), id: e.id.clone(), old: Some(Arc::new(e.clone())), new: None }
    }

    fn sink(k: &Arc<FakeKernel>) -> OverlaySink<Arc<FakeKernel>> {
        OverlaySink::new(k.clone(), IpAddr::V4(LOCAL.into()))
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    #[tokio::test]
    async fn remote_endpoints_become_entries_and_local_ones_do_not() {
        let k = FakeKernel::with_sandbox("n");
        let mut s = sink(&k);
        let (a, b, mine) = (ep("n", "a", 3, 2), ep("n", "b", 4, 3), ep("n", "m", 5, 1));
        s.apply(&[add(&a), add(&b), add(&mine)]).await.expect("apply");
        assert_eq!(k.neigh("n"), vec![ip(3), ip(4)]);
        assert_eq!(k.fdb("n"), vec![(a.mac, Ipv4Addr::new(10, 210, 0, 2)), (b.mac, Ipv4Addr::new(10, 210, 0, 3))]);
        s.apply(&[del(&a)]).await.expect("apply");
        assert_eq!(k.neigh("n"), vec![ip(4)]);
        // Draining changes nothing in the overlay: it is still reachable.
        let mut drained = b.clone();
        drained.state = EndpointState::Draining;
        let before = k.ops.lock().expect("lock").len();
        s.apply(&[Change { network: "n".into(), id: "b".into(), old: Some(Arc::new(b.clone())), new: Some(Arc::new(drained)) }]).await.expect("apply");
        assert_eq!(k.ops.lock().expect("lock").len(), before);
    }

    #[tokio::test]
    async fn an_endpoint_that_moved_node_is_repointed() {
        let k = FakeKernel::with_sandbox("n");
        let mut s = sink(&k);
        let a = ep("n", "a", 3, 2);
        s.apply(&[add(&a)]).await.expect("apply");
        let moved = ep("n", "a", 3, 3);
        s.apply(&[Change { network: "n".into(), id: "a".into(), old: Some(Arc::new(a)), new: Some(Arc::new(moved.clone())) }]).await.expect("apply");
        assert_eq!(k.fdb("n"), vec![(moved.mac, Ipv4Addr::new(10, 210, 0, 3))]);
    }

    #[tokio::test]
    async fn a_reused_address_survives_the_late_removal_of_its_old_owner() {
        let k = FakeKernel::with_sandbox("n");
        let mut s = sink(&k);
        let old = ep("n", "old", 3, 2);
        s.apply(&[add(&old)]).await.expect("apply");
        // The address is given to a new task on node 3; its add arrives before the old
        // task's removal.
        let new = ep("n", "new", 3, 3);
        s.apply(&[add(&new)]).await.expect("apply");
        s.apply(&[del(&old)]).await.expect("apply");
        assert_eq!(k.neigh("n"), vec![ip(3)]);
        assert_eq!(k.fdb("n"), vec![(new.mac, Ipv4Addr::new(10, 210, 0, 3))]);
    }

    #[tokio::test]
    async fn changes_leave_entries_they_do_not_speak_of_and_resyncs_decide() {
        let k = FakeKernel::with_sandbox("n");
        // What a restarted agent finds in its adopted sandbox.
        let (stale, live) = (ep("n", "stale", 9, 2), ep("n", "live", 4, 2));
        {
            let mut t = k.tables.lock().expect("lock");
            let (neigh, fdb) = t.get_mut("n").expect("sandbox");
            for e in [&stale, &live] {
                neigh.insert(e.ip, e.mac);
                fdb.insert(e.mac, Ipv4Addr::new(10, 210, 0, 2));
            }
        }
        let mut s = sink(&k);
        let other = ep("n", "other", 6, 3);
        s.apply(&[add(&other)]).await.expect("apply");
        assert_eq!(k.neigh("n"), vec![ip(4), ip(6), ip(9)], "an unrelated change removes nothing");
        s.resync(&"n".into(), &[Arc::new(other.clone())], Resync::Partial).await.expect("partial");
        assert_eq!(k.neigh("n"), vec![ip(4), ip(6), ip(9)], "a partial resync removes nothing");
        s.resync(&"n".into(), &[Arc::new(other), Arc::new(live)], Resync::Complete).await.expect("complete");
        assert_eq!(k.neigh("n"), vec![ip(4), ip(6)], "a complete resync removes what the table does not hold");
    }

    #[tokio::test]
    async fn no_sandbox_no_work_and_kernel_errors_are_returned() {
        let k = Arc::new(FakeKernel::default());
        let mut s = sink(&k);
        s.apply(&[add(&ep("n", "a", 3, 2))]).await.expect("no sandbox is not an error");
        assert!(k.ops.lock().expect("lock").is_empty());
        k.tables.lock().expect("lock").insert("n".into(), Default::default());
        *k.fail.lock().expect("lock") = true;
        let e = s.apply(&[add(&ep("n", "b", 4, 2))]).await.expect_err("kernel failure");
        assert!(e.to_string().contains("network n"), "{e}");
        *k.fail.lock().expect("lock") = false;
        // What it holds survives the failure: a resync programs both.
        s.resync(&"n".into(), &[Arc::new(ep("n", "a", 3, 2)), Arc::new(ep("n", "b", 4, 2))], Resync::Complete).await.expect("resync");
        assert_eq!(k.neigh("n"), vec![ip(3), ip(4)]);
        s.forget(&"n".into()).await.expect("forget");
        assert!(s.desired.is_empty());
    }
}
