//! Which networks this node is on, and why. A network is wanted while something holds it:
//! each local task holds the networks it is attached to from the moment it is assigned (or
//! found running after a restart) until its links are gone, and other parts of the agent
//! can hold a network without any task (the ingress network will). The node is on a
//! network (its sandbox exists and it takes the network's gossip) exactly while the network
//! is wanted; the runtime never decides a leave, it only releases its hold.
//!
//! Holding and releasing are synchronous bookkeeping, so a caller can register every hold
//! of a new assignment set before anything is torn down; `settle` then makes the node's
//! presence match, one network at a time, serialised.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use swarmnet_types::{Network, NetworkId, SinkError};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// What joining and leaving a network does on this node: its sandbox and its gossip.
#[async_trait::async_trait]
pub trait Fabric: Send + Sync {
    /// Makes (or repairs) the network's sandbox, then takes its gossip. Idempotent. True if
    /// the sandbox was made or repaired now (its entries must be programmed again).
    async fn join(&self, net: &Network) -> Result<bool, SinkError>;
    /// Stops taking the network's gossip, then removes its sandbox.
    async fn leave(&self, net: &NetworkId);
}

/// What the follow loop hears of membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    Joined(NetworkId),
    Left(NetworkId),
}

/// How long from a daemon's first assignments a sandbox that an earlier daemon left is kept
/// even while nothing holds it; the runtime's first prune comes at its end. The holds of the
/// assigned tasks come with those assignments, the node's own hold on the ingress network
/// just after them (the session's `Ingress` message, milliseconds later): within the grace a
/// task torn down at once (a removed task whose process exited while the daemon was away)
/// cannot take a sandbox from under a hold still to come.
pub const STARTUP_GRACE: Duration = Duration::from_secs(3);

struct Wanted {
    network: Network,
    holders: BTreeSet<String>,
}

/// How the node is on a network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Presence {
    /// A sandbox an earlier daemon left: it exists, but this daemon has not joined the
    /// network's gossip nor checked the sandbox yet.
    Adopted,
    /// Joined by this daemon: sandbox made or checked, gossip taken.
    Joined,
}

pub struct Membership {
    wanted: Mutex<BTreeMap<NetworkId, Wanted>>,
    /// Networks the node is on now. The async lock serialises every join and leave.
    present: tokio::sync::Mutex<BTreeMap<NetworkId, Presence>>,
    fabric: Arc<dyn Fabric>,
    notices: mpsc::UnboundedSender<Notice>,
    /// The end of [`STARTUP_GRACE`], once it has started (the first [`Membership::grace_left`]).
    keep_adopted_until: std::sync::OnceLock<Instant>,
}

impl Membership {
    /// `present`: the networks the node already has a sandbox for (adopted after a restart).
    pub fn new(fabric: Arc<dyn Fabric>, present: impl IntoIterator<Item = NetworkId>, notices: mpsc::UnboundedSender<Notice>) -> Membership {
        let present = present.into_iter().map(|n| (n, Presence::Adopted)).collect();
        Membership { wanted: Mutex::new(BTreeMap::new()), present: tokio::sync::Mutex::new(present), fabric, notices, keep_adopted_until: std::sync::OnceLock::new() }
    }

    /// What is left of [`STARTUP_GRACE`], which the first call starts (the runtime's first
    /// assignments): the first prune waits for it.
    pub fn grace_left(&self) -> Duration {
        self.keep_adopted_until.get_or_init(|| Instant::now() + STARTUP_GRACE).saturating_duration_since(Instant::now())
    }

    /// Within the startup grace (or before it started).
    fn in_grace(&self) -> bool {
        self.keep_adopted_until.get().is_none_or(|until| Instant::now() < *until)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<NetworkId, Wanted>> {
        self.wanted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `holder` (a task id, or a name such as `ingress`) needs the node on `net`.
    pub fn hold(&self, net: &Network, holder: &str) {
        let mut w = self.lock();
        let e = w.entry(net.id.clone()).or_insert_with(|| Wanted { network: net.clone(), holders: BTreeSet::new() });
        e.network = net.clone();
        e.holders.insert(holder.to_string());
    }

    /// `holder` no longer needs the node on `net`.
    pub fn release(&self, net: &NetworkId, holder: &str) {
        let mut w = self.lock();
        if let Some(e) = w.get_mut(net) {
            e.holders.remove(holder);
            if e.holders.is_empty() {
                w.remove(net);
            }
        }
    }

    /// The VNI of a network something holds.
    pub fn vni_of(&self, net: &NetworkId) -> Option<u32> {
        self.lock().get(net).map(|w| w.network.vni)
    }

    /// Networks something holds.
    pub fn wanted(&self) -> Vec<NetworkId> {
        self.lock().keys().cloned().collect()
    }

    /// Makes the node's presence on `net` match whether it is wanted; with `repair`, a
    /// network the node is on already is checked and completed too (a task about to plug
    /// into it). A first join, and a repair that had to make something, are announced: the
    /// follow loop resyncs the network into its new sandbox.
    pub async fn settle(&self, net: &NetworkId, repair: bool) -> Result<(), SinkError> {
        self.settle_as(net, repair, false).await
    }

    /// `settle`; `pruning`: leave an unheld adopted sandbox even within the startup grace.
    async fn settle_as(&self, net: &NetworkId, repair: bool, pruning: bool) -> Result<(), SinkError> {
        let mut present = self.present.lock().await;
        let want = self.lock().get(net).map(|w| w.network.clone());
        let cur = present.get(net).copied();
        match (want, cur) {
            (Some(_), Some(Presence::Joined)) if !repair => {}
            (Some(n), cur) => {
                let made = match self.fabric.join(&n).await {
                    Ok(made) => made,
                    Err(e) => {
                        if cur.is_none() {
                            // Undo what a first join made half-way (a sandbox whose set-up
                            // failed, or whose gossip could not be joined).
                            self.fabric.leave(net).await;
                        }
                        return Err(e);
                    }
                };
                let first = cur != Some(Presence::Joined);
                if first {
                    info!(network = %n.name, vni = n.vni, "this node is on the network");
                }
                present.insert(net.clone(), Presence::Joined);
                if first || made {
                    let _ = self.notices.send(Notice::Joined(net.clone()));
                }
            }
            (None, Some(Presence::Adopted)) if !pruning && self.in_grace() => {
                info!(network = %net, "nothing holds the sandbox an earlier daemon left yet: kept until the startup prune");
            }
            (None, Some(_)) => {
                self.fabric.leave(net).await;
                present.remove(net);
                info!(network = %net, "nothing on this node needs the network any more: left it");
                let _ = self.notices.send(Notice::Left(net.clone()));
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// Leaves every network the node is on (adopted ones included) that nothing holds.
    pub async fn prune(&self) {
        let nets: Vec<NetworkId> = self.present.lock().await.keys().cloned().collect();
        for n in nets {
            if let Err(e) = self.settle_as(&n, false, true).await {
                warn!(network = %n, error = %e, "could not settle the node's presence on the network");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        log: Mutex<Vec<String>>,
        fail_join: Mutex<bool>,
        /// What the next join says it made.
        made: Mutex<bool>,
    }

    #[async_trait::async_trait]
    impl Fabric for Recorder {
        async fn join(&self, net: &Network) -> Result<bool, SinkError> {
            if *self.fail_join.lock().expect("lock") {
                return Err(format!("network {} vni {}: create vxlan: address in use", net.name, net.vni).into());
            }
            self.log.lock().expect("lock").push(format!("join {}", net.id));
            Ok(*self.made.lock().expect("lock"))
        }
        async fn leave(&self, net: &NetworkId) {
            self.log.lock().expect("lock").push(format!("leave {net}"));
        }
    }

    fn net(id: &str) -> Network {
        Network {
            id: id.into(),
            name: format!("{id}-name"),
            driver: swarmnet_types::Driver::Overlay,
            attachable: false,
            ingress: false,
            subnet: "10.0.1.0/24".parse().expect("net"),
            gateway: "10.0.1.1".parse().expect("gw"),
            vni: 4096,
        }
    }

    fn setup(present: &[&str]) -> (Arc<Recorder>, Membership, mpsc::UnboundedReceiver<Notice>) {
        let rec = Arc::new(Recorder::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let m = Membership::new(rec.clone(), present.iter().map(|s| s.to_string()), tx);
        (rec, m, rx)
    }

    fn log(r: &Recorder) -> Vec<String> {
        std::mem::take(&mut *r.log.lock().expect("lock"))
    }

    #[tokio::test]
    async fn joins_with_the_first_holder_and_leaves_with_the_last() {
        let (rec, m, mut rx) = setup(&[]);
        m.hold(&net("a"), "t1");
        m.hold(&net("a"), "t2");
        m.settle(&"a".into(), false).await.expect("settle");
        m.settle(&"a".into(), false).await.expect("settle again");
        assert_eq!(log(&rec), vec!["join a"], "one join for two holders");
        assert_eq!(rx.try_recv().ok(), Some(Notice::Joined("a".into())));
        m.release(&"a".into(), "t1");
        m.settle(&"a".into(), false).await.expect("settle");
        assert!(log(&rec).is_empty(), "t2 still holds it");
        m.release(&"a".into(), "t2");
        m.settle(&"a".into(), false).await.expect("settle");
        assert_eq!(log(&rec), vec!["leave a"]);
        assert_eq!(rx.try_recv().ok(), Some(Notice::Left("a".into())));
    }

    #[tokio::test]
    async fn a_network_can_be_held_without_any_task() {
        let (rec, m, _rx) = setup(&[]);
        m.hold(&net("ingress"), "ingress");
        m.settle(&"ingress".into(), false).await.expect("settle");
        assert_eq!(log(&rec), vec!["join ingress"]);
        assert_eq!(m.wanted(), vec!["ingress".to_string()]);
        m.prune().await;
        assert!(log(&rec).is_empty(), "a held network is not pruned");
    }

    #[tokio::test]
    async fn an_adopted_sandbox_is_joined_on_its_first_want_even_without_repair() {
        let (rec, m, mut rx) = setup(&["a"]);
        m.hold(&net("a"), "ingress");
        m.settle(&"a".into(), false).await.expect("settle");
        assert_eq!(log(&rec), vec!["join a"], "its gossip is taken and its sandbox checked");
        assert_eq!(rx.try_recv().ok(), Some(Notice::Joined("a".into())));
    }

    #[tokio::test]
    async fn a_task_stopping_after_a_restart_does_not_take_the_network_from_adopted_ones() {
        // The restart case: the sandbox of "a" is adopted; the new assignment set holds "a"
        // for two adopted tasks before the stale task that is no longer wanted goes.
        let (rec, m, _rx) = setup(&["a"]);
        m.hold(&net("a"), "stale");
        m.hold(&net("a"), "adopted1");
        m.hold(&net("a"), "adopted2");
        m.release(&"a".into(), "stale");
        m.settle(&"a".into(), false).await.expect("settle");
        assert!(!log(&rec).contains(&"leave a".to_string()), "the adopted tasks keep the sandbox");
    }

    #[tokio::test]
    async fn an_adopted_sandbox_outlives_a_teardown_in_the_startup_grace_until_the_prune() {
        // A removed task whose process exited while the daemon was away is torn down at
        // once, before the node's own hold on the ingress network has come.
        let (rec, m, mut rx) = setup(&["ingress"]);
        m.hold(&net("ingress"), "stale");
        m.release(&"ingress".into(), "stale");
        m.settle(&"ingress".into(), false).await.expect("settle");
        assert!(log(&rec).is_empty(), "kept within the grace");
        assert!(rx.try_recv().is_err());
        // The hold that comes next finds the sandbox the tasks' links are in.
        m.hold(&net("ingress"), "ingress");
        m.settle(&"ingress".into(), true).await.expect("settle");
        assert_eq!(log(&rec), vec!["join ingress"]);
        assert!(m.grace_left() > STARTUP_GRACE - Duration::from_secs(1), "the first call starts the grace");
        // Without a hold the first prune takes it, grace or not.
        let (rec, m, _rx) = setup(&["old"]);
        m.hold(&net("old"), "stale");
        m.release(&"old".into(), "stale");
        m.settle(&"old".into(), false).await.expect("settle");
        assert!(log(&rec).is_empty());
        m.prune().await;
        assert_eq!(log(&rec), vec!["leave old"]);
    }

    #[tokio::test]
    async fn after_the_startup_grace_an_unheld_adopted_sandbox_goes_with_its_last_task() {
        let (rec, m, _rx) = setup(&["a"]);
        m.keep_adopted_until.set(Instant::now()).expect("not started yet");
        m.hold(&net("a"), "t1");
        m.release(&"a".into(), "t1");
        m.settle(&"a".into(), false).await.expect("settle");
        assert_eq!(log(&rec), vec!["leave a"]);
    }

    #[tokio::test]
    async fn an_adopted_sandbox_nobody_wants_is_removed() {
        let (rec, m, _rx) = setup(&["old"]);
        m.prune().await;
        assert_eq!(log(&rec), vec!["leave old"]);
    }

    #[tokio::test]
    async fn a_failed_first_join_is_undone_and_can_be_retried() {
        let (rec, m, _rx) = setup(&[]);
        m.hold(&net("a"), "t1");
        *rec.fail_join.lock().expect("lock") = true;
        let e = m.settle(&"a".into(), false).await.expect_err("join fails");
        assert!(e.to_string().contains("address in use"), "{e}");
        assert_eq!(log(&rec), vec!["leave a"], "what the failed first join made is undone");
        *rec.fail_join.lock().expect("lock") = false;
        m.settle(&"a".into(), false).await.expect("retry");
        assert_eq!(log(&rec), vec!["join a"]);
        // A failed repair leaves the network the node is on alone.
        *rec.fail_join.lock().expect("lock") = true;
        m.settle(&"a".into(), true).await.expect_err("repair fails");
        assert!(log(&rec).is_empty());
    }

    #[tokio::test]
    async fn a_repair_is_announced_only_when_it_had_to_make_something() {
        let (rec, m, mut rx) = setup(&[]);
        m.hold(&net("a"), "t1");
        m.settle(&"a".into(), false).await.expect("join");
        assert_eq!(rx.try_recv().ok(), Some(Notice::Joined("a".into())));
        m.settle(&"a".into(), true).await.expect("repair");
        assert_eq!(log(&rec), vec!["join a", "join a"], "a repair checks the sandbox");
        assert!(rx.try_recv().is_err(), "nothing was missing: no resync");
        *rec.made.lock().expect("lock") = true;
        m.settle(&"a".into(), true).await.expect("repair");
        assert_eq!(rx.try_recv().ok(), Some(Notice::Joined("a".into())), "a remade vxlan device is resynced");
    }
}
