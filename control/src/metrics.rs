//! `--metrics-addr` (issue 21, dockerd's flag): the daemon's metrics in the OpenMetrics text
//! format Prometheus scrapes, on `GET /metrics`. Everything is read when scraped — the
//! parts keep plain counters (`swarmnet_types::metrics`) or state they already hold (the
//! gossip table, the load balancer's maps read back from the kernel, the manager's state) —
//! so metrics cost nothing between scrapes, on or off.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use swarmnet_agent::Agent;
use swarmnet_api::replies::LbTable;
use swarmnet_manager::Manager;
use swarmnet_types::metrics::HistogramSnapshot;

use crate::http::{self, Handler};

type Labels = Vec<(String, String)>;

/// A histogram as read, for the encoder (which wants each bucket's own count).
#[derive(Debug)]
struct Snap(HistogramSnapshot);

impl EncodeMetric for Snap {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut prev = 0;
        let own: Vec<(f64, u64)> = self
            .0
            .buckets
            .iter()
            .map(|(b, c)| {
                let n = c.saturating_sub(prev);
                prev = *c;
                (*b, n)
            })
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.0.sum, self.0.count, &own, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// One scrape's registry, filled with values as read.
struct Out(Registry);

impl Out {
    fn gauge(&mut self, name: &str, help: &str, v: i64) {
        let g: Gauge = Gauge::default();
        g.set(v);
        self.0.register(name, help, g);
    }
    fn counter(&mut self, name: &str, help: &str, v: u64) {
        let c: Counter = Counter::default();
        c.inc_by(v);
        self.0.register(name, help, c);
    }
    fn gauges(&mut self, name: &str, help: &str, rows: Vec<(Labels, i64)>) {
        let f: Family<Labels, Gauge> = Family::default();
        for (l, v) in rows {
            f.get_or_create(&l).set(v);
        }
        self.0.register(name, help, f);
    }
    fn counters(&mut self, name: &str, help: &str, rows: Vec<(Labels, u64)>) {
        let f: Family<Labels, Counter> = Family::default();
        for (l, v) in rows {
            f.get_or_create(&l).inc_by(v);
        }
        self.0.register(name, help, f);
    }
    fn histogram(&mut self, name: &str, help: &str, s: HistogramSnapshot) {
        self.0.register(name, help, Snap(s));
    }
}

fn l1(k: &str, v: impl ToString) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

fn i(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Counts of `items` by key, every key in `all` present (0 if none).
fn count_by<T>(items: &[T], all: &[&str], key: impl Fn(&T) -> String) -> Vec<(String, i64)> {
    let mut m: std::collections::BTreeMap<String, i64> = all.iter().map(|k| (k.to_string(), 0)).collect();
    for it in items {
        *m.entry(key(it)).or_default() += 1;
    }
    m.into_iter().collect()
}

/// The node's part: gossip, overlay, load balancer, routing mesh, DNS.
async fn node(out: &mut Out, agent: &Agent) {
    if let Ok(s) = agent.gossip.stats().await {
        out.gauges(
            "gossip_members",
            "Other nodes by state as this node's gossip sees them: alive; suspect (declared down, still probed); down (listed by the manager, neither)",
            vec![(l1("state", "alive"), s.members_alive as i64), (l1("state", "suspect"), s.members_suspect as i64), (l1("state", "down"), s.members_down as i64)],
        );
        out.counters(
            "gossip_messages",
            "Gossip messages by direction (sent: datagrams; received: datagrams and stream messages opened)",
            vec![(l1("direction", "sent"), s.udp_sent), (l1("direction", "received"), s.received)],
        );
        out.counters(
            "gossip_bytes",
            "Gossip bytes by direction and transport (sent before sealing)",
            vec![
                (vec![("direction".into(), "sent".into()), ("transport".into(), "udp".into())], s.udp_bytes),
                (vec![("direction".into(), "sent".into()), ("transport".into(), "tcp".into())], s.stream_bytes),
                (vec![("direction".into(), "received".into()), ("transport".into(), "any".into())], s.received_bytes),
            ],
        );
        out.counter("gossip_sealing_bytes", "Bytes the sealing added to gossip sent", s.sealing_bytes);
        out.counters(
            "gossip_messages_refused",
            "Gossip messages dropped, by reason",
            vec![
                (l1("reason", "unauthenticated"), s.unauthenticated),
                (l1("reason", "malformed"), s.malformed),
                (l1("reason", "oversized"), s.oversized),
                (l1("reason", "stale"), s.stale),
                (l1("reason", "unanswered"), s.unanswered),
            ],
        );
        out.counter("gossip_failures_detected", "Members this node's failure detector declared down", s.failures_detected);
        out.counters(
            "gossip_suspicions",
            "Suspicions this node's probes raised (raised), and of those the ones its timer turned into a death (declared_down, a part of raised)",
            vec![(l1("outcome", "raised"), s.suspicions), (l1("outcome", "declared_down"), s.suspicions_to_death)],
        );
        out.counters(
            "gossip_self_suspicions",
            "This node's answers to being suspected or declared down: refuted in time; came back under a new generation after being declared down; started over after losing every member",
            vec![(l1("outcome", "refuted"), s.refutations), (l1("outcome", "rejoined"), s.rejoins), (l1("outcome", "renewed"), s.renewals)],
        );
        out.counters(
            "gossip_pushes",
            "Pushed changes and membership records sent again for want of an acknowledgement, and given up on after the last try",
            vec![(l1("outcome", "retransmitted"), s.retransmitted), (l1("outcome", "given_up"), s.push_given_up), (l1("outcome", "deferred"), s.retransmits_deferred)],
        );
        out.counters(
            "gossip_exchanges_held_back",
            "Exchanges this node would have started but did not (max_syncs running: anti-entropy, new members, view requests) and whole views not sent (full_replies_per_sec spent)",
            vec![(l1("reason", "max_syncs"), s.syncs_deferred), (l1("reason", "full_view_rate"), s.full_replies_withheld)],
        );
        out.histogram("gossip_probe_rtt_seconds", "Round trips of this node's direct failure-detector probes (ping to ack)", s.probe_rtt.snapshot());
    }
    let ov = agent.runtime.overlay_stats();
    out.gauge("overlay_remote_endpoints", "Remote endpoints programmed (one neighbour and one FDB entry each), all networks", ov.remotes.load(Relaxed) as i64);
    out.gauge("overlay_networks", "Networks with remote endpoints on this node", ov.networks.load(Relaxed) as i64);
    out.counter("overlay_entry_changes", "Neighbour and FDB entries added, changed or removed", ov.entry_changes.load(Relaxed));
    out.counter("overlay_programming_failures", "Failures to program a network's entries", ov.failures.load(Relaxed));
    out.histogram("overlay_programming_seconds", "Time to bring one network's neighbour and FDB entries in line", ov.sync_latency.snapshot());

    if let Ok(t) = agent.lb_table().await.into_data::<LbTable>() {
        let backend = t.backend.map(|b| b.to_string()).unwrap_or_else(|| "none".into());
        out.gauges("lb_info", "The load balancer's kind on this node", vec![(l1("kind", backend), 1)]);
        out.gauge("lb_services", "Service VIPs programmed on this node", i(t.services.len()));
        let backends: Vec<_> = t.services.iter().flat_map(|s| s.backends.iter()).collect();
        let states = count_by(&backends, &["active", "draining"], |b| format!("{:?}", b.state).to_lowercase());
        out.gauges("lb_backends", "Backends of the node's VIPs, by state", states.into_iter().map(|(k, v)| (l1("state", k), v)).collect());
        // Gauges: the sum over the backends the VIP has now (a backend that goes takes its
        // count with it).
        out.gauges(
            "lb_connections_handed",
            "New connections and UDP flows the load balancer handed to the service's current backends, as counted in its maps",
            t.services
                .iter()
                .map(|s| (vec![("service".into(), s.service.clone()), ("vip".into(), s.vip.to_string())], i64::try_from(s.backends.iter().map(|b| b.connections).sum::<u64>()).unwrap_or(i64::MAX)))
                .collect(),
        );
        out.gauge("lb_backends_in_use", "Backends that were handed at least one connection", i(backends.iter().filter(|b| b.connections > 0).count()));
        out.gauge("mesh_published_ports", "Published ports this node answers (the routing mesh)", i(t.ports.len()));
        let pb: Vec<_> = t.ports.iter().flat_map(|p| p.backends.iter()).collect();
        let states = count_by(&pb, &["active", "draining"], |b| format!("{:?}", b.state).to_lowercase());
        out.gauges("mesh_backends", "Backends of the node's published ports, by state", states.into_iter().map(|(k, v)| (l1("state", k), v)).collect());
        let entry = format!("{:?}", t.mesh_entry).to_lowercase();
        out.gauges("mesh_entry_info", "How clients enter the routing mesh on this node", vec![(l1("entry", &entry), 1)]);
        out.gauges(
            "mesh_flows_handed",
            "New connections and UDP flows the routing mesh handed to the port's current backends on this node, by entry path",
            t.ports
                .iter()
                .map(|p| {
                    (
                        vec![("entry".into(), entry.clone()), ("service".into(), p.service.clone()), ("port".into(), format!("{}/{}", p.published, p.protocol))],
                        i64::try_from(p.backends.iter().map(|b| b.connections).sum::<u64>()).unwrap_or(i64::MAX),
                    )
                })
                .collect(),
        );
    }

    let c = &agent.runtime.dns().shared.counters;
    out.counters("dns_queries", "Queries the node's resolvers answered, by type", c.qtypes.read().into_iter().map(|(k, v)| (l1("type", k), v)).collect());
    out.counters("dns_responses", "Replies of the node's resolvers, by code", c.rcodes.read().into_iter().map(|(k, v)| (l1("rcode", k), v)).collect());
    out.counters(
        "dns_answers",
        "Queries by who answered: the cluster's records, an upstream, or nobody",
        vec![
            (l1("source", "local"), c.local.load(Relaxed)),
            (l1("source", "forwarded"), c.forwarded.load(Relaxed)),
            (l1("source", "upstream_failure"), c.upstream_failures.load(Relaxed)),
            (l1("source", "refused_or_malformed"), c.refused.load(Relaxed)),
        ],
    );
    out.histogram("dns_upstream_seconds", "How long forwarded queries took upstream", c.upstream_latency.snapshot());
}

/// The manager's part (only while it leads): the cluster as its state holds it.
fn manager(out: &mut Out, m: &Manager) {
    let st = m.state();
    let nodes: Vec<_> = st.nodes.values().collect();
    let mut rows: std::collections::BTreeMap<Labels, i64> = std::collections::BTreeMap::new();
    for n in &nodes {
        let l = vec![("role".into(), n.role.to_string()), ("status".into(), format!("{:?}", n.status).to_lowercase()), ("availability".into(), n.availability.to_string())];
        *rows.entry(l).or_default() += 1;
    }
    out.gauges("manager_nodes", "Nodes of the cluster by role, status and availability", rows.into_iter().collect());
    let tasks: Vec<_> = st.tasks.values().collect();
    let states = count_by(&tasks, &["pending", "assigned", "starting", "running", "complete", "failed", "shutdown"], |t| format!("{:?}", t.state).to_lowercase());
    out.gauges("manager_tasks", "Tasks the manager keeps, by state", states.into_iter().map(|(k, v)| (l1("state", k), v)).collect());
    out.gauge("manager_services", "Services of the cluster", i(st.services.len()));
    out.gauge("manager_networks", "Networks of the cluster", i(st.networks.len()));
    out.gauge("manager_leader", "1 while this manager leads the cluster", i64::from(m.leads()));
    out.histogram("manager_api_seconds", "Time to answer an API request (the CLI's, or a node's over 2377)", m.api_latency.snapshot());
}

/// The process: the names Prometheus's client libraries use.
fn process(out: &mut Out) {
    let sc = |v| nix::unistd::sysconf(v).ok().flatten().map(|n| n as f64);
    let page = sc(nix::unistd::SysconfVar::PAGE_SIZE).unwrap_or(4096.0);
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        let f: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        // Fields from 3 (state): utime 14, stime 15, starttime 22, rss 24.
        let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let ticks = sc(nix::unistd::SysconfVar::CLK_TCK).unwrap_or(100.0);
        let c: prometheus_client::metrics::counter::Counter<f64, std::sync::atomic::AtomicU64> = Default::default();
        c.inc_by((field(14) + field(15)) / ticks);
        out.0.register("process_cpu_seconds", "Total user and system CPU time spent in seconds", c);
        let g: Gauge<f64, std::sync::atomic::AtomicU64> = Default::default();
        g.set(field(24) * page);
        out.0.register("process_resident_memory_bytes", "Resident memory size in bytes", g);
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())).unwrap_or(0.0);
        let g: Gauge<f64, std::sync::atomic::AtomicU64> = Default::default();
        g.set(boot + field(22) / ticks);
        out.0.register("process_start_time_seconds", "Start time of the process since unix epoch in seconds", g);
    }
    let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
    out.gauge("process_open_fds", "Number of open file descriptors", i(fds));
}

/// Every metric of this daemon now, as text.
pub async fn render(agent: &Agent, manager: Option<Arc<Manager>>) -> String {
    let mut ours = Out(Registry::with_prefix("swarmnet"));
    node(&mut ours, agent).await;
    if let Some(m) = manager.as_deref() {
        self::manager(&mut ours, m);
    }
    let mut proc = Out(Registry::default());
    process(&mut proc);
    let mut s = String::new();
    let _ = prometheus_client::encoding::text::encode_registry(&mut s, &ours.0);
    let _ = prometheus_client::encoding::text::encode_registry(&mut s, &proc.0);
    let _ = prometheus_client::encoding::text::encode_eof(&mut s);
    s
}

/// The OpenMetrics text as Prometheus's older text format (0.0.4), for a scraper that
/// does not ask for OpenMetrics (`curl`, `promtool check metrics`): a counter's family is
/// named with its `_total`, and there is no `# EOF` or `# UNIT`.
pub fn to_text_004(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The handler of `--metrics-addr`: `GET /metrics`.
pub fn handler(agent: Arc<Agent>, slot: Option<tokio::sync::watch::Receiver<Option<Arc<Manager>>>>) -> Handler {
    Arc::new(move |req| {
        let agent = agent.clone();
        let leading = slot.as_ref().and_then(|s| s.borrow().clone()).filter(|m| m.leads());
        Box::pin(async move {
            if req.uri().path() != "/metrics" {
                return http::respond(404, "text/plain; charset=utf-8", "404 not found: the metrics are at /metrics\n");
            }
            if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
                return http::respond(405, "text/plain; charset=utf-8", "405 method not allowed: GET /metrics\n");
            }
            let openmetrics = req.headers().get(hyper::header::ACCEPT).and_then(|a| a.to_str().ok()).is_some_and(|a| a.contains("application/openmetrics-text"));
            let body = render(&agent, leading).await;
            if openmetrics {
                http::respond(200, "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
            } else {
                http::respond(200, "text/plain; version=0.0.4; charset=utf-8", to_text_004(&body))
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_reads_as_the_older_text_format() {
        let om =
            "# HELP swarmnet_x Things\n# TYPE swarmnet_x counter\nswarmnet_x_total{a=\"b\"} 3\n# HELP swarmnet_g A gauge\n# TYPE swarmnet_g gauge\n# UNIT swarmnet_g seconds\nswarmnet_g 1\n# EOF\n";
        assert_eq!(to_text_004(om), "# HELP swarmnet_x_total Things\n# TYPE swarmnet_x_total counter\nswarmnet_x_total{a=\"b\"} 3\n# HELP swarmnet_g A gauge\n# TYPE swarmnet_g gauge\nswarmnet_g 1\n");
    }

    #[test]
    fn a_histogram_encodes_cumulative_buckets_once() {
        let h = swarmnet_types::metrics::Histogram::new(&[0.1, 1.0]);
        h.observe(std::time::Duration::from_millis(50));
        h.observe(std::time::Duration::from_millis(500));
        let mut out = Out(Registry::default());
        out.histogram("lat_seconds", "Latency", h.snapshot());
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &out.0).expect("encode");
        assert!(
            s.contains("lat_seconds_bucket{le=\"0.1\"} 1\n")
                && s.contains("lat_seconds_bucket{le=\"1.0\"} 2\n")
                && s.contains("lat_seconds_bucket{le=\"+Inf\"} 2\n")
                && s.contains("lat_seconds_count 2\n"),
            "{s}"
        );
    }
}
