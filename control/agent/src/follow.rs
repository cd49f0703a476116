//! The agent's one follow loop (ADR 0008): reads the endpoint table's change stream and
//! feeds every sink (overlay, DNS; later the load balancer and ingress) through the
//! [`Sink`] trait, with one policy for everything that is not a plain change:
//!
//! - a change batch goes to every sink in order; a sink that fails gets the batch's
//!   networks resynced after `retry` (the others are not held back), then after twice as
//!   long while it keeps failing, up to 30 s (a full map does not fill the log every second);
//! - the stream lagged (changes were lost): every network the node is on is resynced;
//! - the node joined a network (or repaired its sandbox): that network is resynced;
//! - the node left a network: every sink forgets it;
//! - for `warmup` after the node joins a network, that network's resyncs are
//!   [`Resync::Partial`] (its table is still filling: after a restart the adopted sandbox
//!   has entries the table has not heard of yet, and removing them would cut live traffic);
//!   when it ends the network is resynced completely, and so is every network every
//!   `periodic`, against drift;
//! - the table cannot be read (the gossip loop stopped): nothing is resynced, and no sink is
//!   ever told a network is empty; if the stream itself closed, the loop ends with an error
//!   in the log and the kernel keeps the state it has;
//! - an input from outside the table (`SinkInput`: the manager's word, the runtime's tasks,
//!   a reader) goes to the sink it names, between batches: every sink has one writer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use swarmnet_gossip::server::{GossipHandle, Stopped};
use swarmnet_gossip::Event;
use swarmnet_types::{Change, Endpoint, NetworkId, Resync, Sink, SinkInput};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tracing::{debug, error, warn};

use crate::membership::Notice;

/// Where the loop reads the table: the node's gossip, or a fake in tests.
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    fn subscribe(&self) -> broadcast::Receiver<Event>;
    /// The endpoints of `network` now; an error if that cannot be known (never an empty
    /// list in its place).
    async fn endpoints(&self, network: &NetworkId) -> Result<Vec<Arc<Endpoint>>, Stopped>;
}

#[async_trait::async_trait]
impl Source for GossipHandle {
    fn subscribe(&self) -> broadcast::Receiver<Event> {
        GossipHandle::subscribe(self)
    }

    async fn endpoints(&self, network: &NetworkId) -> Result<Vec<Arc<Endpoint>>, Stopped> {
        GossipHandle::endpoints(self, network).await
    }
}

/// The longest wait between two retries of a failing sink.
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct FollowConfig {
    pub warmup: Duration,
    pub periodic: Duration,
    pub retry: Duration,
}

impl Default for FollowConfig {
    fn default() -> Self {
        FollowConfig { warmup: Duration::from_secs(5), periodic: Duration::from_secs(30), retry: Duration::from_secs(1) }
    }
}

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The change stream closed: the gossip loop is gone.
    StreamClosed,
}

struct Follower<S> {
    source: S,
    sinks: Vec<Box<dyn Sink>>,
    /// Networks the node is on, as membership announced them.
    joined: BTreeSet<NetworkId>,
    /// Networks still in their warm-up, and when it ends.
    warming: BTreeMap<NetworkId, Instant>,
    /// Per sink index: networks to resync at `retry_at`.
    retry: BTreeMap<usize, BTreeSet<NetworkId>>,
    retry_at: Option<Instant>,
    /// The wait before the next retry: `cfg.retry`, doubled while retries fail.
    retry_delay: Duration,
    cfg: FollowConfig,
}

/// Runs until the change stream closes. A change that happens before the loop subscribes
/// is not lost: every network is resynced when membership announces it.
pub async fn follow<S: Source>(source: S, sinks: Vec<Box<dyn Sink>>, mut notices: mpsc::UnboundedReceiver<Notice>, mut inputs: mpsc::UnboundedReceiver<SinkInput>, cfg: FollowConfig) -> Ended {
    let mut events = source.subscribe();
    let mut periodic = tokio::time::interval_at(Instant::now() + cfg.periodic, cfg.periodic);
    periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut f = Follower { source, sinks, joined: BTreeSet::new(), warming: BTreeMap::new(), retry: BTreeMap::new(), retry_at: None, retry_delay: cfg.retry, cfg };
    let mut notices_open = true;
    let mut inputs_open = true;
    loop {
        let retry_at = f.retry_at;
        let warm_at = f.warming.values().min().copied();
        tokio::select! {
            e = events.recv() => match e {
                Ok(first) => {
                    let mut batch: Vec<Change> = Vec::new();
                    let mut lagged = false;
                    let mut closed = false;
                    collect(first, &mut batch);
                    loop {
                        match events.try_recv() {
                            Ok(e) => collect(e, &mut batch),
                            Err(TryRecvError::Lagged(n)) => {
                                warn!(missed = n, "the follow loop fell behind the endpoint stream: resyncing every network");
                                lagged = true;
                            }
                            Err(TryRecvError::Closed) => {
                                closed = true;
                                break;
                            }
                            Err(TryRecvError::Empty) => break,
                        }
                    }
                    f.apply(&batch).await;
                    if lagged {
                        f.resync_all().await;
                    }
                    if closed {
                        return stream_closed();
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    warn!(missed = n, "the follow loop fell behind the endpoint stream: resyncing every network");
                    f.resync_all().await;
                }
                Err(RecvError::Closed) => return stream_closed(),
            },
            n = notices.recv(), if notices_open => match n {
                Some(Notice::Joined(net)) => {
                    if f.joined.insert(net.clone()) && !f.cfg.warmup.is_zero() {
                        f.warming.insert(net.clone(), Instant::now() + f.cfg.warmup);
                    }
                    f.resync(&net, None).await;
                }
                Some(Notice::Left(net)) => {
                    f.joined.remove(&net);
                    f.warming.remove(&net);
                    f.forget(&net).await;
                }
                None => notices_open = false,
            },
            _ = tokio::time::sleep_until(warm_at.unwrap_or_else(Instant::now)), if warm_at.is_some() => {
                let now = Instant::now();
                let due: Vec<NetworkId> = f.warming.iter().filter(|(_, t)| **t <= now).map(|(n, _)| n.clone()).collect();
                for net in due {
                    f.warming.remove(&net);
                    debug!(network = %net, "warm-up over: complete resync");
                    f.resync(&net, None).await;
                }
            }
            i = inputs.recv(), if inputs_open => match i {
                Some(i) => f.input(i).await,
                None => inputs_open = false,
            },
            _ = periodic.tick() => f.resync_all().await,
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                f.retry_now().await;
                f.retries_done();
            }
        }
    }
}

fn stream_closed() -> Ended {
    error!("the endpoint stream closed (the gossip loop is gone): overlay, DNS and the other sinks keep the state they have and get no more updates");
    Ended::StreamClosed
}

fn collect(e: Event, batch: &mut Vec<Change>) {
    if let Event::Endpoint(c) = e {
        batch.push(c);
    }
}

impl<S: Source> Follower<S> {
    fn how(&self, net: &NetworkId) -> Resync {
        if self.warming.contains_key(net) {
            Resync::Partial
        } else {
            Resync::Complete
        }
    }

    fn schedule_retry(&mut self, sink: usize, nets: impl IntoIterator<Item = NetworkId>) {
        self.retry.entry(sink).or_default().extend(nets);
        if self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + self.retry_delay);
        }
    }

    async fn apply(&mut self, batch: &[Change]) {
        if batch.is_empty() {
            return;
        }
        for i in 0..self.sinks.len() {
            if let Err(e) = self.sinks[i].apply(batch).await {
                let nets: BTreeSet<NetworkId> = batch.iter().map(|c| c.network.clone()).collect();
                warn!(sink = self.sinks[i].name(), networks = ?nets, error = %e, "sink failed to apply changes: resyncing those networks shortly");
                self.schedule_retry(i, nets);
            }
        }
    }

    /// Resyncs `net` in every sink (or only in `only`).
    async fn resync(&mut self, net: &NetworkId, only: Option<usize>) {
        let eps = match self.source.endpoints(net).await {
            Ok(eps) => eps,
            Err(e) => {
                // Never hand a sink an empty table for a table we could not read.
                error!(network = %net, error = %e, "cannot read the endpoint table: resync skipped, kernel state kept");
                return;
            }
        };
        let how = self.how(net);
        for i in 0..self.sinks.len() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            if let Err(e) = self.sinks[i].resync(net, &eps, how).await {
                warn!(sink = self.sinks[i].name(), network = %net, error = %e, "sink failed to resync: trying again shortly");
                self.schedule_retry(i, [net.clone()]);
            }
        }
    }

    async fn resync_all(&mut self) {
        for net in self.joined.clone() {
            self.resync(&net, None).await;
        }
    }

    async fn retry_now(&mut self) {
        self.retry_at = None;
        // If this round fails again, the next one waits twice as long.
        self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
        for (i, nets) in std::mem::take(&mut self.retry) {
            for net in nets {
                // A network left meanwhile needs nothing more.
                if self.joined.contains(&net) {
                    self.resync(&net, Some(i)).await;
                }
            }
        }
    }

    /// After a round of retries, if none failed again, the next failure waits `cfg.retry`.
    fn retries_done(&mut self) {
        if self.retry.is_empty() {
            self.retry_delay = self.cfg.retry;
        }
    }

    /// Hands an input to the sink it names.
    async fn input(&mut self, i: SinkInput) {
        match self.sinks.iter_mut().find(|s| s.name() == i.sink) {
            Some(s) => {
                if let Err(e) = s.input(i.input).await {
                    warn!(sink = i.sink, error = %e, "sink failed to take an input");
                }
            }
            None => warn!(sink = i.sink, "an input for a sink this node does not have"),
        }
    }

    async fn forget(&mut self, net: &NetworkId) {
        for s in self.sinks.iter_mut() {
            if let Err(e) = s.forget(net).await {
                warn!(sink = s.name(), network = %net, error = %e, "sink failed to forget a network");
            }
        }
        for nets in self.retry.values_mut() {
            nets.remove(net);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::{Arc, Mutex};
    use swarmnet_types::{EndpointState, SinkError};

    /// A table in memory with a change stream; `stop()` makes reads fail as a dead gossip
    /// loop does.
    struct FakeSource {
        tx: Mutex<Option<broadcast::Sender<Event>>>,
        rx: broadcast::Receiver<Event>,
        table: Mutex<BTreeMap<NetworkId, Vec<Arc<Endpoint>>>>,
        stopped: Mutex<bool>,
    }

    impl FakeSource {
        fn new(capacity: usize) -> Arc<FakeSource> {
            let (tx, rx) = broadcast::channel(capacity);
            Arc::new(FakeSource { tx: Mutex::new(Some(tx)), rx, table: Mutex::new(BTreeMap::new()), stopped: Mutex::new(false) })
        }
        fn set(&self, net: &str, eps: Vec<Endpoint>) {
            self.table.lock().expect("lock").insert(net.into(), eps.into_iter().map(Arc::new).collect());
        }
        fn emit(&self, c: Change) {
            if let Some(tx) = self.tx.lock().expect("lock").as_ref() {
                let _ = tx.send(Event::Endpoint(c));
            }
        }
        fn stop(&self) {
            *self.stopped.lock().expect("lock") = true;
        }
        fn close(&self) {
            self.tx.lock().expect("lock").take();
        }
    }

    #[async_trait::async_trait]
    impl Source for Arc<FakeSource> {
        fn subscribe(&self) -> broadcast::Receiver<Event> {
            self.rx.resubscribe()
        }
        async fn endpoints(&self, network: &NetworkId) -> Result<Vec<Arc<Endpoint>>, Stopped> {
            if *self.stopped.lock().expect("lock") {
                return Err(Stopped);
            }
            Ok(self.table.lock().expect("lock").get(network).cloned().unwrap_or_default())
        }
    }

    /// Records every call; can be told to fail.
    #[derive(Default)]
    struct Log {
        calls: Mutex<Vec<String>>,
        fail: Mutex<bool>,
    }

    struct Recording(&'static str, Arc<Log>);

    #[async_trait::async_trait]
    impl Sink for Recording {
        fn name(&self) -> &'static str {
            self.0
        }
        async fn apply(&mut self, changes: &[Change]) -> Result<(), SinkError> {
            self.1.calls.lock().expect("lock").push(format!("{} apply {}", self.0, changes.iter().map(|c| c.id.as_str()).collect::<Vec<_>>().join(",")));
            if *self.1.fail.lock().expect("lock") {
                return Err("kernel said no".into());
            }
            Ok(())
        }
        async fn resync(&mut self, network: &NetworkId, endpoints: &[Arc<Endpoint>], how: Resync) -> Result<(), SinkError> {
            self.1.calls.lock().expect("lock").push(format!("{} resync {network} {:?} [{}]", self.0, how, endpoints.iter().map(|e| e.id.as_str()).collect::<Vec<_>>().join(",")));
            if *self.1.fail.lock().expect("lock") {
                return Err("kernel said no".into());
            }
            Ok(())
        }
        async fn forget(&mut self, network: &NetworkId) -> Result<(), SinkError> {
            self.1.calls.lock().expect("lock").push(format!("{} forget {network}", self.0));
            Ok(())
        }
        async fn input(&mut self, input: Box<dyn std::any::Any + Send>) -> Result<(), SinkError> {
            let s = input.downcast::<String>().map_err(|_| "not an input of this sink")?;
            self.1.calls.lock().expect("lock").push(format!("{} input {s}", self.0));
            Ok(())
        }
    }

    fn ep(net: &str, id: &str) -> Endpoint {
        Endpoint {
            network: net.into(),
            id: id.into(),
            task_name: id.into(),
            service_name: "web".into(),
            service_id: "s".into(),
            aliases: vec![],
            ip: Ipv4Addr::new(10, 0, 0, 3),
            mac: [2, 0x42, 10, 0, 0, 3],
            vtep: IpAddr::V4(Ipv4Addr::new(10, 210, 0, 2)),
            vip: None,
            ports: vec![],
            state: EndpointState::Active,
        }
    }

    fn add(net: &str, id: &str) -> Change {
        Change { network: net.into(), id: id.into(), old: None, new: Some(Arc::new(ep(net, id))) }
    }

    struct Harness {
        src: Arc<FakeSource>,
        log: Arc<Log>,
        dns_log: Arc<Log>,
        notices: mpsc::UnboundedSender<Notice>,
        inputs: mpsc::UnboundedSender<SinkInput>,
        task: tokio::task::JoinHandle<Ended>,
    }

    fn start(capacity: usize, cfg: FollowConfig) -> Harness {
        let src = FakeSource::new(capacity);
        let log = Arc::new(Log::default());
        let dns_log = Arc::new(Log::default());
        let (notices, rx) = mpsc::unbounded_channel();
        let sinks: Vec<Box<dyn Sink>> = vec![Box::new(Recording("overlay", log.clone())), Box::new(Recording("dns", dns_log.clone()))];
        let (inputs, inputs_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(follow(src.clone(), sinks, rx, inputs_rx, cfg));
        Harness { src, log, dns_log, notices, inputs, task }
    }

    fn cfg() -> FollowConfig {
        FollowConfig { warmup: Duration::from_secs(5), periodic: Duration::from_secs(30), retry: Duration::from_secs(1) }
    }

    fn take(l: &Log) -> Vec<String> {
        std::mem::take(&mut *l.calls.lock().expect("lock"))
    }

    /// Lets the loop run what is due without moving the (paused) clock.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_input_reaches_the_sink_it_names_in_turn_with_the_changes() {
        let h = start(64, cfg());
        settle().await;
        h.src.emit(add("n", "a"));
        settle().await;
        h.inputs.send(SinkInput { sink: "dns", input: Box::new("set me".to_string()) }).expect("send");
        h.inputs.send(SinkInput { sink: "nobody", input: Box::new("lost".to_string()) }).expect("send");
        settle().await;
        h.src.emit(add("n", "b"));
        settle().await;
        assert_eq!(take(&h.dns_log), vec!["dns apply a", "dns input set me", "dns apply b"]);
        assert_eq!(take(&h.log), vec!["overlay apply a", "overlay apply b"], "only the named sink gets it");
    }

    #[tokio::test(start_paused = true)]
    async fn changes_reach_every_sink_in_order() {
        let h = start(64, cfg());
        settle().await;
        h.src.emit(add("n", "a"));
        h.src.emit(add("n", "b"));
        settle().await;
        assert_eq!(take(&h.log), vec!["overlay apply a,b"]);
        assert_eq!(take(&h.dns_log), vec!["dns apply a,b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn each_network_resyncs_partially_until_warm_then_completely_and_leaves_forget() {
        let h = start(64, cfg());
        h.src.set("n", vec![ep("n", "a")]);
        h.notices.send(Notice::Joined("n".into())).expect("send");
        settle().await;
        assert_eq!(take(&h.log), vec!["overlay resync n Partial [a]"]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        // A repair of n (a task starting on it) does not restart its warm-up; m just joined.
        h.notices.send(Notice::Joined("n".into())).expect("send");
        h.notices.send(Notice::Joined("m".into())).expect("send");
        settle().await;
        assert_eq!(take(&h.log), vec!["overlay resync n Partial [a]", "overlay resync m Partial []"]);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        settle().await;
        assert_eq!(take(&h.log), vec!["overlay resync n Complete [a]"], "the end of n's warm-up resyncs it completely");
        h.notices.send(Notice::Joined("n".into())).expect("send");
        settle().await;
        assert_eq!(take(&h.log), vec!["overlay resync n Complete [a]"]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        settle().await;
        assert_eq!(take(&h.log), vec!["overlay resync m Complete []"]);
        h.notices.send(Notice::Left("m".into())).expect("send");
        settle().await;
        assert_eq!(take(&h.log), vec!["overlay forget m"]);
        tokio::time::sleep(Duration::from_secs(25)).await;
        settle().await;
        assert_eq!(take(&h.log), vec!["overlay resync n Complete [a]"], "the periodic resync covers the networks the node is on");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lagged_stream_resyncs_every_network() {
        let h = start(4, FollowConfig { warmup: Duration::ZERO, ..cfg() });
        h.notices.send(Notice::Joined("n".into())).expect("send");
        settle().await;
        take(&h.log);
        h.src.set("n", (0..10).map(|i| ep("n", &format!("e{i}"))).collect());
        for i in 0..10 {
            h.src.emit(add("n", &format!("e{i}")));
        }
        settle().await;
        let calls = take(&h.log);
        assert!(calls.iter().any(|c| c == "overlay resync n Complete [e0,e1,e2,e3,e4,e5,e6,e7,e8,e9]"), "{calls:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_gossip_loop_never_reads_as_an_empty_network() {
        let h = start(64, FollowConfig { warmup: Duration::ZERO, ..cfg() });
        h.src.set("n", vec![ep("n", "a")]);
        h.notices.send(Notice::Joined("n".into())).expect("send");
        settle().await;
        assert_eq!(take(&h.log), vec!["overlay resync n Complete [a]"]);
        assert_eq!(take(&h.dns_log), vec!["dns resync n Complete [a]"]);
        // The loop stops answering: resyncs (periodic, a join) are skipped, not emptied.
        h.src.stop();
        tokio::time::sleep(Duration::from_secs(31)).await;
        h.notices.send(Notice::Joined("n".into())).expect("send");
        settle().await;
        assert!(take(&h.log).is_empty(), "no sink heard of the network at all");
        // Then its stream closes: the loop ends, still without touching any sink.
        h.src.close();
        let ended = tokio::time::timeout(Duration::from_secs(1), h.task).await.expect("the loop ends").expect("join");
        assert_eq!(ended, Ended::StreamClosed);
        assert!(take(&h.log).is_empty() && take(&h.dns_log).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_sink_is_resynced_later_without_holding_back_the_others() {
        let h = start(64, FollowConfig { warmup: Duration::ZERO, ..cfg() });
        h.notices.send(Notice::Joined("n".into())).expect("send");
        settle().await;
        take(&h.log);
        take(&h.dns_log);
        *h.log.fail.lock().expect("lock") = true;
        h.src.set("n", vec![ep("n", "a")]);
        h.src.emit(add("n", "a"));
        settle().await;
        assert_eq!(take(&h.log), vec!["overlay apply a"]);
        assert_eq!(take(&h.dns_log), vec!["dns apply a"]);
        *h.log.fail.lock().expect("lock") = false;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        settle().await;
        assert_eq!(take(&h.log), vec!["overlay resync n Complete [a]"]);
        assert!(take(&h.dns_log).is_empty(), "only the sink that failed is resynced");
    }

    #[tokio::test(start_paused = true)]
    async fn a_sink_that_keeps_failing_is_retried_less_and_less_often() {
        let h = start(64, FollowConfig { warmup: Duration::ZERO, ..cfg() });
        h.notices.send(Notice::Joined("n".into())).expect("send");
        settle().await;
        take(&h.log);
        *h.log.fail.lock().expect("lock") = true;
        h.src.emit(add("n", "a"));
        settle().await;
        take(&h.log);
        // Retries at +1 s, then +2 s, then +4 s.
        let mut at = Vec::new();
        for s in 1..=7u64 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            settle().await;
            if !take(&h.log).is_empty() {
                at.push(s);
            }
        }
        assert_eq!(at, vec![1, 3, 7], "retried after 1, 2 and 4 s");
        *h.log.fail.lock().expect("lock") = false;
    }
}
