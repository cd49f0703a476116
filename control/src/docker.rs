//! `--docker-api` (issue 21): the read-only part of the Docker Engine API that the swarm
//! ecosystem reads — Prometheus's `dockerswarm_sd_configs` (roles nodes, services, tasks),
//! the docker CLI's `node ls`, `service ls`, `service ps`, `network ls` — answered from
//! swarmnet's own API (the manager that leads, through this node's daemon), on every node.
//! Writes answer 501 naming swarmnet's command. Docker's version negotiation: `/_ping`
//! says API 1.41, paths may carry `/v1.24`…`/v1.41`.
//!
//! The shapes are Docker's (`github.com/docker/docker/api/types/swarm`); what swarmnet does
//! not have is given Docker's zero value (a container image is the task command's program,
//! times swarmnet does not keep are Go's zero time).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use swarmnet_agent::Agent;
use swarmnet_api::replies::{NetworkInfo, NodeDetail, NodeInfo, ServiceInfo, ServiceModeName, TaskInfo};
use swarmnet_api::{ApiError, ApiRequest, ErrorKind, Role};
use swarmnet_manager::Manager;
use swarmnet_types::{Port, Protocol, PublishMode};

use crate::http::{self, Body, Handler};

/// The newest API version served, and the oldest.
pub const API_VERSION: (u32, u32) = (1, 41);
pub const MIN_API_VERSION: (u32, u32) = (1, 24);
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";
const ENGINE: &str = concat!("swarmnet-", env!("CARGO_PKG_VERSION"));

/// A Docker API error: its status and `{"message": …}`.
#[derive(Debug, PartialEq)]
pub struct DockerError(pub u16, pub String);

impl DockerError {
    fn not_found(what: &str, id: &str) -> DockerError {
        DockerError(404, format!("{what} {id} not found"))
    }
}

impl From<ApiError> for DockerError {
    fn from(e: ApiError) -> DockerError {
        let status = match e.kind {
            ErrorKind::NotFound => 404,
            ErrorKind::Invalid => 400,
            ErrorKind::Conflict => 409,
            ErrorKind::NotManager | ErrorKind::Unavailable => 503,
            _ => 500,
        };
        DockerError(status, e.message)
    }
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Ping,
    Version,
    Info,
    Nodes,
    Node(String),
    Services,
    Service(String),
    Tasks,
    Task(String),
    Networks,
    Network(String),
}

fn version_of(v: &str) -> Option<(u32, u32)> {
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The route of `method path`, after the optional `/vX.Y` prefix; a write is refused with
/// the swarmnet command that does it.
pub fn route(method: &Method, path: &str) -> Result<Route, DockerError> {
    let mut p = path;
    if let Some(rest) = p.strip_prefix("/v") {
        let (v, tail) = rest.split_once('/').unwrap_or((rest, ""));
        if let Some(ver) = version_of(v) {
            if ver > API_VERSION {
                return Err(DockerError(400, format!("client version {v} is too new. Maximum supported API version is {}.{}", API_VERSION.0, API_VERSION.1)));
            }
            if ver < MIN_API_VERSION {
                return Err(DockerError(
                    400,
                    format!("client version {v} is too old. Minimum supported API version is {}.{}, please upgrade your client to a newer version", MIN_API_VERSION.0, MIN_API_VERSION.1),
                ));
            }
            // The rest, with its leading slash ("/" if nothing follows the version).
            p = if rest.contains('/') { &path[path.len() - tail.len() - 1..] } else { "/" };
        }
    }
    let parts: Vec<&str> = p.trim_end_matches('/').split('/').skip(1).collect();
    if *method != Method::GET && *method != Method::HEAD {
        let cmd = match (parts.first().copied(), method) {
            (Some("services"), &Method::DELETE) => "swarmnet service rm",
            (Some("services"), _) if parts.last() == Some(&"update") => "swarmnet service update",
            (Some("services"), _) => "swarmnet service create",
            (Some("nodes"), &Method::DELETE) => "swarmnet node rm",
            (Some("nodes"), _) => "swarmnet node update",
            (Some("networks"), &Method::DELETE) => "swarmnet network rm",
            (Some("networks"), _) => "swarmnet network create",
            (Some("swarm"), _) => "swarmnet manager / swarmnet agent --join / swarmnet swarm leave",
            _ => "swarmnet --help",
        };
        return Err(DockerError(501, format!("swarmnet's Docker API is read-only: {method} {p} is not served; use `{cmd}`")));
    }
    Ok(match parts.as_slice() {
        ["_ping"] => Route::Ping,
        ["version"] => Route::Version,
        ["info"] => Route::Info,
        ["nodes"] => Route::Nodes,
        ["nodes", id] => Route::Node(id.to_string()),
        ["services"] => Route::Services,
        ["services", id] => Route::Service(id.to_string()),
        ["tasks"] => Route::Tasks,
        ["tasks", id] => Route::Task(id.to_string()),
        ["networks"] => Route::Networks,
        ["networks", id] => Route::Network(id.to_string()),
        ["services", _, "logs"] => return Err(DockerError(501, "service logs are not served here: use `swarmnet service logs`".into())),
        _ => return Err(DockerError(404, format!("page not found: {p}"))),
    })
}

/// `%XX` and `+` decoded.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                Ok(v) => {
                    out.push(v);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query's parameters.
pub fn query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("").split('&').filter(|kv| !kv.is_empty()).map(|kv| kv.split_once('=').map(|(k, v)| (unescape(k), unescape(v))).unwrap_or_else(|| (unescape(kv), String::new()))).collect()
}

/// Docker's `filters`: `{"name":{"web":true}}` or the older `{"name":["web"]}`.
pub type Filters = BTreeMap<String, Vec<String>>;

pub fn filters(q: &HashMap<String, String>) -> Result<Filters, DockerError> {
    let Some(raw) = q.get("filters").filter(|f| !f.is_empty()) else { return Ok(Filters::new()) };
    let v: Value = serde_json::from_str(raw).map_err(|e| DockerError(400, format!("invalid filter: {e}")))?;
    let obj = v.as_object().ok_or_else(|| DockerError(400, "invalid filter: expected an object".into()))?;
    let mut out = Filters::new();
    for (k, vals) in obj {
        let list: Vec<String> = match vals {
            Value::Object(m) => m.iter().filter(|(_, on)| on.as_bool() != Some(false)).map(|(k, _)| k.clone()).collect(),
            Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
            _ => return Err(DockerError(400, format!("invalid filter {k:?}"))),
        };
        out.insert(k.clone(), list);
    }
    Ok(out)
}

/// Checks that every filter key is one `allowed`.
fn known(f: &Filters, allowed: &[&str]) -> Result<(), DockerError> {
    match f.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(DockerError(400, format!("invalid filter '{k}'"))),
        None => Ok(()),
    }
}

/// Whether the values of filter `key` (any of them) accept what `ok` accepts; no such
/// filter accepts everything.
fn accepts(f: &Filters, key: &str, ok: impl Fn(&str) -> bool) -> bool {
    f.get(key).is_none_or(|vals| vals.is_empty() || vals.iter().any(|v| ok(v)))
}

/// A `label` filter's value (`KEY` or `KEY=VALUE`) against labels.
fn label_ok(labels: &BTreeMap<String, String>, want: &str) -> bool {
    match want.split_once('=') {
        Some((k, v)) => labels.get(k).is_some_and(|x| x == v),
        None => labels.contains_key(want),
    }
}

fn time(ms: u64) -> String {
    if ms == 0 {
        return ZERO_TIME.into();
    }
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "x86_64",
        "aarch64" => "aarch64",
        a => a,
    }
}

fn s<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// A node as Docker's `swarm.Node`. `manager_addr`: a manager's `host:port` on 2377.
pub fn node_json(n: &NodeInfo, manager_addr: Option<&str>) -> Value {
    let mut v = json!({
        "ID": n.id,
        "Version": {"Index": 1},
        "CreatedAt": ZERO_TIME,
        "UpdatedAt": ZERO_TIME,
        "Spec": {"Labels": n.labels, "Role": s(n.role), "Availability": n.availability.to_string()},
        "Description": {
            "Hostname": n.hostname,
            "Platform": {"Architecture": arch(), "OS": "linux"},
            "Resources": {"NanoCPUs": 0, "MemoryBytes": 0},
            "Engine": {"EngineVersion": ENGINE, "Labels": {}, "Plugins": []}
        },
        "Status": {"State": s(n.status), "Addr": n.address.to_string()}
    });
    if n.role == Role::Manager {
        let leader = matches!(n.manager_status, Some(swarmnet_api::replies::ManagerStatus::Leader));
        let reach = match n.manager_status {
            Some(swarmnet_api::replies::ManagerStatus::Unreachable) => "unreachable",
            _ => "reachable",
        };
        v["ManagerStatus"] = json!({"Leader": leader, "Reachability": reach, "Addr": manager_addr.map(str::to_string).unwrap_or_else(|| format!("{}:2377", n.address))});
    }
    v
}

fn port_json(p: &Port) -> Value {
    json!({"Protocol": match p.protocol { Protocol::Tcp => "tcp", Protocol::Udp => "udp" }, "TargetPort": p.target, "PublishedPort": p.published, "PublishMode": match p.mode { PublishMode::Ingress => "ingress", PublishMode::Host => "host" }})
}

fn image(command: &[String]) -> String {
    command.first().cloned().unwrap_or_default()
}

fn net_by_name<'a>(nets: &'a [NetworkInfo], name: &str) -> Option<&'a NetworkInfo> {
    nets.iter().find(|n| n.name == name)
}

/// A service as Docker's `swarm.Service`; with `status`, its `ServiceStatus`.
pub fn service_json(svc: &ServiceInfo, nets: &[NetworkInfo], status: bool) -> Value {
    let ports: Vec<Value> = svc.ports.iter().map(port_json).collect();
    let mode_name = s(svc.endpoint_mode);
    let networks: Vec<Value> = svc.networks.iter().filter_map(|n| net_by_name(nets, n)).map(|n| json!({"Target": n.id, "Aliases": svc.aliases.get(&n.name).cloned().unwrap_or_default()})).collect();
    let vips: Vec<Value> = svc.vips.iter().filter_map(|(name, vip)| net_by_name(nets, name).map(|n| json!({"NetworkID": n.id, "Addr": format!("{vip}/{}", n.subnet.prefix())}))).collect();
    let mode = match svc.mode {
        ServiceModeName::Replicated => json!({"Replicated": {"Replicas": svc.desired_replicas}}),
        ServiceModeName::Global => json!({"Global": {}}),
    };
    let env: Vec<String> = svc.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut v = json!({
        "ID": svc.id,
        "Version": {"Index": svc.version.max(1)},
        "CreatedAt": ZERO_TIME,
        "UpdatedAt": ZERO_TIME,
        "Spec": {
            "Name": svc.name,
            "Labels": svc.labels,
            "TaskTemplate": {
                "ContainerSpec": {"Image": image(&svc.command), "Command": svc.command, "Env": env, "Isolation": "default"},
                "Placement": {"Constraints": svc.constraints},
                "Networks": networks,
                "ForceUpdate": 0,
                "Runtime": "container"
            },
            "Mode": mode,
            "UpdateConfig": {"Parallelism": svc.update_config.parallelism, "Delay": svc.update_config.delay_ms.saturating_mul(1_000_000), "FailureAction": "pause", "Order": "start-first"},
            "EndpointSpec": {"Mode": mode_name, "Ports": ports}
        },
        "Endpoint": {"Spec": {"Mode": mode_name, "Ports": ports}, "Ports": ports, "VirtualIPs": vips}
    });
    if status {
        v["ServiceStatus"] = json!({"RunningTasks": svc.running_replicas, "DesiredTasks": svc.desired_replicas, "CompletedTasks": 0});
    }
    v
}

/// A task as Docker's `swarm.Task`, typed (a list of 10,000 is written straight from these,
/// without a JSON tree per task).
#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TaskDoc<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    version: Index,
    created_at: &'a str,
    updated_at: &'a str,
    name: &'a str,
    labels: Empty,
    spec: TaskSpecDoc<'a>,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    slot: Option<u64>,
    #[serde(rename = "NodeID")]
    node_id: &'a str,
    status: TaskStatusDoc<'a>,
    desired_state: &'static str,
    networks_attachments: Vec<AttachmentDoc<'a>>,
}

#[derive(serde::Serialize)]
struct Index {
    #[serde(rename = "Index")]
    index: u64,
}

#[derive(serde::Serialize)]
struct Empty {}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct TaskSpecDoc<'a> {
    container_spec: ContainerSpecDoc<'a>,
    networks: Vec<TargetDoc<'a>>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerSpecDoc<'a> {
    image: &'a str,
    command: &'a [String],
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct TargetDoc<'a> {
    target: &'a str,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct TaskStatusDoc<'a> {
    timestamp: &'a str,
    state: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    err: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_status: Option<ContainerStatusDoc<'a>>,
    port_status: PortStatusDoc,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerStatusDoc<'a> {
    #[serde(rename = "ContainerID")]
    container_id: &'a str,
    #[serde(rename = "PID")]
    pid: u32,
    exit_code: i32,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct PortStatusDoc {
    ports: Vec<Value>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct AttachmentDoc<'a> {
    network: NetworkRefDoc<'a>,
    addresses: [String; 1],
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct NetworkRefDoc<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    spec: NetworkSpecDoc<'a>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct NetworkSpecDoc<'a> {
    name: &'a str,
    labels: Empty,
    driver_configuration: DriverDoc,
    scope: &'static str,
    ingress: bool,
    attachable: bool,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct DriverDoc {
    name: &'static str,
}

fn state_str(t: swarmnet_api::TaskState) -> &'static str {
    use swarmnet_api::TaskState::*;
    match t {
        Pending => "pending",
        Assigned => "assigned",
        Starting => "starting",
        Running => "running",
        Complete => "complete",
        Failed => "failed",
        Shutdown => "shutdown",
    }
}

/// A task's document; `time` is its state's time, formatted by the caller (once per task).
pub fn task_doc<'a>(t: &'a TaskInfo, svc: Option<&'a ServiceInfo>, nets: &'a [NetworkInfo], time: &'a str) -> TaskDoc<'a> {
    let attachments: Vec<AttachmentDoc<'a>> = t
        .addresses
        .iter()
        .filter_map(|(name, ip)| {
            let n = net_by_name(nets, name)?;
            let driver = match n.driver {
                swarmnet_types::Driver::Overlay => "overlay",
            };
            Some(AttachmentDoc {
                network: NetworkRefDoc {
                    id: &n.id,
                    spec: NetworkSpecDoc { name: &n.name, labels: Empty {}, driver_configuration: DriverDoc { name: driver }, scope: "swarm", ingress: n.ingress, attachable: n.attachable },
                },
                addresses: [format!("{ip}/{}", n.subnet.prefix())],
            })
        })
        .collect();
    let command: &[String] = svc.map(|s| s.command.as_slice()).unwrap_or(&[]);
    let state = state_str(t.state);
    let failed = t.state == swarmnet_api::TaskState::Failed || (!t.error.is_empty() && t.state != swarmnet_api::TaskState::Running);
    TaskDoc {
        id: &t.id,
        version: Index { index: t.version.max(1) },
        created_at: time,
        updated_at: time,
        name: &t.name,
        labels: Empty {},
        spec: TaskSpecDoc {
            container_spec: ContainerSpecDoc { image: command.first().map(String::as_str).unwrap_or(""), command },
            networks: attachments.iter().map(|a| TargetDoc { target: a.network.id }).collect(),
        },
        service_id: t.service_id.as_deref().unwrap_or(""),
        slot: t.slot,
        node_id: t.node_id.as_deref().unwrap_or(""),
        status: TaskStatusDoc {
            timestamp: time,
            state,
            message: if t.error.is_empty() { state } else { &t.error },
            err: failed.then_some(t.error.as_str()),
            container_status: t.pid.map(|pid| ContainerStatusDoc { container_id: &t.id, pid, exit_code: 0 }),
            port_status: PortStatusDoc { ports: svc.map(|s| s.ports.iter().filter(|p| p.mode == PublishMode::Host).map(port_json).collect()).unwrap_or_default() },
        },
        desired_state: match t.desired_state {
            swarmnet_api::DesiredState::Running => "running",
            swarmnet_api::DesiredState::Shutdown => "shutdown",
        },
        networks_attachments: attachments,
    }
}

/// A task as Docker's `swarm.Task`, as JSON.
pub fn task_json(t: &TaskInfo, svc: Option<&ServiceInfo>, nets: &[NetworkInfo]) -> Value {
    let time = time(t.since_ms);
    serde_json::to_value(task_doc(t, svc, nets, &time)).unwrap_or_default()
}

/// A network as Docker's `types.NetworkResource`.
pub fn network_json(n: &NetworkInfo) -> Value {
    json!({
        "Name": n.name,
        "Id": n.id,
        "Created": ZERO_TIME,
        "Scope": "swarm",
        "Driver": s(n.driver),
        "EnableIPv6": false,
        "IPAM": {"Driver": "default", "Options": null, "Config": [{"Subnet": n.subnet.to_string(), "Gateway": n.gateway.to_string()}]},
        "Internal": false,
        "Attachable": n.attachable,
        "Ingress": n.ingress,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": false,
        "Containers": {},
        "Options": {"com.docker.network.driver.overlay.vxlanid_list": n.vni.to_string()},
        "Labels": {}
    })
}

/// One object by id, unique id prefix, or name.
fn find<'a, T>(items: &'a [T], key: &str, id: impl Fn(&T) -> &str, name: impl Fn(&T) -> &str, what: &str) -> Result<&'a T, DockerError> {
    if let Some(x) = items.iter().find(|x| id(x) == key).or_else(|| items.iter().find(|x| name(x) == key)) {
        return Ok(x);
    }
    let by_prefix: Vec<&T> = items.iter().filter(|x| id(x).starts_with(key)).collect();
    match by_prefix.as_slice() {
        [one] => Ok(one),
        [] => Err(DockerError::not_found(what, key)),
        _ => Err(DockerError(404, format!("{what} {key} is ambiguous ({} matches)", by_prefix.len()))),
    }
}

/// The tasks `f` selects (filters id, name, service, node, desired-state, label).
pub fn select_tasks<'a>(tasks: &'a [TaskInfo], services: &[ServiceInfo], f: &Filters) -> Result<Vec<&'a TaskInfo>, DockerError> {
    known(f, &["id", "name", "service", "node", "desired-state", "label"])?;
    let svc_of = |t: &TaskInfo| t.service_id.as_ref().and_then(|id| services.iter().find(|s| &s.id == id));
    Ok(tasks
        .iter()
        .filter(|t| accepts(f, "id", |v| t.id.starts_with(v)))
        .filter(|t| accepts(f, "name", |v| t.name.starts_with(v)))
        .filter(|t| accepts(f, "service", |v| svc_of(t).is_some_and(|s| s.id == v || s.name == v || s.id.starts_with(v))))
        .filter(|t| accepts(f, "node", |v| t.node_id.as_deref() == Some(v) || t.node == v))
        .filter(|t| accepts(f, "desired-state", |v| s(t.desired_state) == v || v == "accepted" && t.desired_state == swarmnet_api::DesiredState::Running))
        // Tasks carry no labels: a label filter selects none.
        .filter(|_| f.get("label").is_none_or(|v| v.is_empty()))
        .collect())
}

/// Serves the API from this node's daemon.
pub struct Docker {
    agent: Arc<Agent>,
    slot: Option<tokio::sync::watch::Receiver<Option<Arc<Manager>>>>,
}

fn headers(r: &mut Response<Body>) {
    let h = r.headers_mut();
    for (k, v) in [("api-version", format!("{}.{}", API_VERSION.0, API_VERSION.1)), ("server", format!("{ENGINE} (linux)")), ("ostype", "linux".into()), ("docker-experimental", "false".into())] {
        if let Ok(v) = hyper::header::HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    }
}

fn error(e: DockerError) -> Response<Body> {
    let mut r = http::respond(e.0, "application/json", serde_json::to_vec(&json!({"message": e.1})).unwrap_or_default());
    headers(&mut r);
    r
}

impl Docker {
    async fn call<T: DeserializeOwned>(&self, req: ApiRequest) -> Result<T, DockerError> {
        let leading = self.slot.as_ref().and_then(|s| s.borrow().clone()).filter(|m| m.leads());
        let reply = match leading {
            Some(m) => tokio::task::block_in_place(|| m.api(req, Some(&self.agent.id.node_id))),
            None => self.agent.call(req).await.map_err(|e| DockerError(503, format!("the swarm's manager cannot be reached from this node: {e:#}")))?,
        };
        Ok(reply.into_data().map_err(|e| e.into_api())?)
    }

    fn is_manager(&self) -> bool {
        self.slot.is_some()
    }

    async fn manager_addrs(&self, nodes: &[NodeInfo]) -> HashMap<String, String> {
        let mut out = HashMap::new();
        for n in nodes.iter().filter(|n| n.role == Role::Manager) {
            if let Ok(d) = self.call::<NodeDetail>(ApiRequest::NodeInspect { node: n.id.clone() }).await {
                if let Some(a) = d.manager_addr {
                    out.insert(n.id.clone(), a);
                }
            }
        }
        out
    }

    /// The answer to `r` as JSON bytes.
    async fn answer(&self, r: Route, q: &HashMap<String, String>) -> Result<Vec<u8>, DockerError> {
        if r == Route::Tasks {
            return self.tasks(q).await;
        }
        let v = self.answer_value(r, q).await?;
        serde_json::to_vec(&v).map_err(|e| DockerError(500, format!("cannot encode the answer: {e}")))
    }

    /// `/tasks`: written from typed documents (10,000 tasks in one answer).
    async fn tasks(&self, q: &HashMap<String, String>) -> Result<Vec<u8>, DockerError> {
        let f = filters(q)?;
        let (services, nets) = self.services_and_networks().await?;
        let leading = self.slot.as_ref().and_then(|s| s.borrow().clone()).filter(|m| m.leads());
        let tasks: Vec<TaskInfo> = match leading {
            Some(m) => tokio::task::block_in_place(|| m.task_list()),
            None => self.agent.call_typed::<Vec<TaskInfo>>(ApiRequest::TaskLs).await.map_err(|e| DockerError(503, format!("the swarm's manager cannot be reached from this node: {e:#}")))??,
        };
        tokio::task::block_in_place(|| {
            let by_id: HashMap<&str, &ServiceInfo> = services.iter().map(|x| (x.id.as_str(), x)).collect();
            let sel = select_tasks(&tasks, &services, &f)?;
            let times: Vec<String> = sel.iter().map(|t| time(t.since_ms)).collect();
            let docs: Vec<TaskDoc> = sel.iter().zip(&times).map(|(t, tm)| task_doc(t, t.service_id.as_deref().and_then(|id| by_id.get(id).copied()), &nets, tm)).collect();
            serde_json::to_vec(&docs).map_err(|e| DockerError(500, format!("cannot encode the tasks: {e}")))
        })
    }

    async fn answer_value(&self, r: Route, q: &HashMap<String, String>) -> Result<Value, DockerError> {
        let f = filters(q)?;
        Ok(match r {
            Route::Ping => Value::Null,
            Route::Version => json!({
                "Platform": {"Name": "swarmnet"},
                "Components": [{"Name": "Engine", "Version": ENGINE, "Details": {
                    "ApiVersion": format!("{}.{}", API_VERSION.0, API_VERSION.1),
                    "MinAPIVersion": format!("{}.{}", MIN_API_VERSION.0, MIN_API_VERSION.1),
                    "Os": "linux",
                    "Arch": arch(),
                    "KernelVersion": kernel(),
                    "Experimental": "false",
                    "GitCommit": "",
                    "GoVersion": "",
                    "BuildTime": ZERO_TIME
                }}],
                "Version": ENGINE,
                "ApiVersion": format!("{}.{}", API_VERSION.0, API_VERSION.1),
                "MinAPIVersion": format!("{}.{}", MIN_API_VERSION.0, MIN_API_VERSION.1),
                "GitCommit": "",
                "GoVersion": "",
                "Os": "linux",
                "Arch": arch(),
                "KernelVersion": kernel(),
                "BuildTime": ZERO_TIME
            }),
            Route::Info => self.info().await,
            Route::Nodes => {
                known(&f, &["id", "label", "node.label", "membership", "name", "role"])?;
                let nodes: Vec<NodeInfo> = self.call(ApiRequest::NodeLs).await?;
                let addrs = self.manager_addrs(&nodes).await;
                let sel: Vec<Value> = nodes
                    .iter()
                    .filter(|n| accepts(&f, "id", |v| n.id.starts_with(v)))
                    .filter(|n| accepts(&f, "name", |v| n.hostname.starts_with(v)))
                    .filter(|n| accepts(&f, "role", |v| v == s(n.role)))
                    .filter(|_| accepts(&f, "membership", |v| v == "accepted"))
                    .filter(|n| accepts(&f, "node.label", |v| label_ok(&n.labels, v)))
                    // Engine labels: a node has none here.
                    .filter(|_| f.get("label").is_none_or(|v| v.is_empty()))
                    .map(|n| node_json(n, addrs.get(&n.id).map(String::as_str)))
                    .collect();
                json!(sel)
            }
            Route::Node(id) => {
                let nodes: Vec<NodeInfo> = self.call(ApiRequest::NodeLs).await?;
                let n = find(&nodes, &id, |n| &n.id, |n| &n.hostname, "node")?;
                let addrs = self.manager_addrs(std::slice::from_ref(n)).await;
                node_json(n, addrs.get(&n.id).map(String::as_str))
            }
            Route::Services => {
                known(&f, &["id", "label", "mode", "name"])?;
                let status = q.get("status").is_some_and(|v| v == "true" || v == "1");
                let (services, nets) = self.services_and_networks().await?;
                let sel: Vec<Value> = services
                    .iter()
                    .filter(|x| accepts(&f, "id", |v| x.id.starts_with(v)))
                    .filter(|x| accepts(&f, "name", |v| x.name.starts_with(v)))
                    .filter(|x| accepts(&f, "mode", |v| v == s(x.mode)))
                    .filter(|x| accepts(&f, "label", |v| label_ok(&x.labels, v)))
                    .map(|x| service_json(x, &nets, status))
                    .collect();
                json!(sel)
            }
            Route::Service(id) => {
                let (services, nets) = self.services_and_networks().await?;
                service_json(find(&services, &id, |x| &x.id, |x| &x.name, "service")?, &nets, false)
            }
            Route::Tasks => return Err(DockerError(500, "tasks are answered apart".into())),
            Route::Task(id) => {
                let (services, nets) = self.services_and_networks().await?;
                let tasks: Vec<TaskInfo> = self.call(ApiRequest::TaskLs).await?;
                let t = find(&tasks, &id, |t| &t.id, |t| &t.id, "task")?;
                task_json(t, t.service_id.as_deref().and_then(|sid| services.iter().find(|x| x.id == sid)), &nets)
            }
            Route::Networks => {
                known(&f, &["dangling", "driver", "id", "label", "name", "scope", "type"])?;
                let nets: Vec<NetworkInfo> = self.call(ApiRequest::NetworkLs).await?;
                let sel: Vec<Value> = nets
                    .iter()
                    .filter(|n| accepts(&f, "id", |v| n.id.starts_with(v)))
                    .filter(|n| accepts(&f, "name", |v| n.name.contains(v)))
                    .filter(|n| accepts(&f, "driver", |v| v == s(n.driver)))
                    .filter(|_| accepts(&f, "scope", |v| v == "swarm"))
                    .filter(|_| accepts(&f, "type", |v| v == "custom"))
                    .map(network_json)
                    .collect();
                json!(sel)
            }
            Route::Network(id) => {
                let nets: Vec<NetworkInfo> = self.call(ApiRequest::NetworkLs).await?;
                network_json(find(&nets, &id, |n| &n.id, |n| &n.name, "network")?)
            }
        })
    }

    async fn services_and_networks(&self) -> Result<(Vec<ServiceInfo>, Vec<NetworkInfo>), DockerError> {
        let services: Vec<ServiceInfo> = self.call(ApiRequest::ServiceLs).await?;
        let nets: Vec<NetworkInfo> = self.call(ApiRequest::NetworkLs).await?;
        Ok((services, nets))
    }

    async fn info(&self) -> Value {
        let me = &self.agent.id;
        let nodes: Vec<NodeInfo> = self.call(ApiRequest::NodeLs).await.unwrap_or_default();
        let managers: Vec<&NodeInfo> = nodes.iter().filter(|n| n.role == Role::Manager).collect();
        let addrs = self.manager_addrs(&nodes).await;
        let addr = nodes.iter().find(|n| n.id == me.node_id).map(|n| n.address.to_string()).unwrap_or_default();
        let remote: Vec<Value> = managers.iter().map(|n| json!({"NodeID": n.id, "Addr": addrs.get(&n.id).cloned().unwrap_or_else(|| format!("{}:2377", n.address))})).collect();
        let mut swarm = json!({
            "NodeID": me.node_id,
            "NodeAddr": addr,
            "LocalNodeState": "active",
            "ControlAvailable": self.is_manager(),
            "Error": "",
            "RemoteManagers": remote,
            "Nodes": nodes.len(),
            "Managers": managers.len()
        });
        if self.is_manager() {
            swarm["Cluster"] = json!({"ID": me.cluster_id, "Version": {"Index": 1}, "CreatedAt": ZERO_TIME, "UpdatedAt": ZERO_TIME, "Spec": {"Name": "default", "Labels": {}}});
        }
        json!({
            "ID": me.node_id,
            "Name": self.agent.hostname(),
            "ServerVersion": ENGINE,
            "OperatingSystem": "swarmnet",
            "OSType": "linux",
            "Architecture": arch(),
            "KernelVersion": kernel(),
            "NCPU": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "MemTotal": mem_total(),
            "Containers": 0, "ContainersRunning": 0, "ContainersPaused": 0, "ContainersStopped": 0, "Images": 0,
            "Driver": "none",
            "Labels": [],
            "Swarm": swarm
        })
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let head = req.method() == Method::HEAD;
        let r = match route(req.method(), req.uri().path()) {
            Ok(r) => r,
            Err(e) => return error(e),
        };
        if r == Route::Ping {
            let mut resp = http::respond(200, "text/plain; charset=utf-8", if head { "" } else { "OK" });
            headers(&mut resp);
            let swarm = if self.is_manager() { "active/manager" } else { "active/worker" };
            for (k, v) in [("swarm", swarm), ("cache-control", "no-cache, no-store, must-revalidate"), ("pragma", "no-cache")] {
                resp.headers_mut().insert(k, hyper::header::HeaderValue::from_static(v));
            }
            return resp;
        }
        let q = query(req.uri().query());
        match self.answer(r, &q).await {
            Ok(_) if head => {
                let mut resp = http::respond(200, "application/json", Vec::<u8>::new());
                headers(&mut resp);
                resp
            }
            Ok(bytes) => {
                let mut resp = http::respond(200, "application/json", bytes);
                headers(&mut resp);
                resp
            }
            Err(e) => error(e),
        }
    }
}

fn kernel() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
}

fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix(" kB")?.trim().parse::<u64>().ok()))
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The handler of `--docker-api`.
pub fn handler(agent: Arc<Agent>, slot: Option<tokio::sync::watch::Receiver<Option<Arc<Manager>>>>) -> Handler {
    let d = Arc::new(Docker { agent, slot });
    Arc::new(move |req| {
        let d = d.clone();
        Box::pin(async move { d.handle(req).await })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_with_and_without_a_version_and_writes_name_the_command() {
        assert_eq!(route(&Method::GET, "/_ping"), Ok(Route::Ping));
        assert_eq!(route(&Method::GET, "/v1.41/nodes"), Ok(Route::Nodes));
        assert_eq!(route(&Method::GET, "/v1.24/services/web"), Ok(Route::Service("web".into())));
        assert_eq!(route(&Method::GET, "/tasks/"), Ok(Route::Tasks));
        assert_eq!(route(&Method::GET, "/v1.41").map_err(|e| e.0), Err(404));
        assert_eq!(route(&Method::GET, "/v1.43/nodes").map_err(|e| e.0), Err(400));
        assert!(route(&Method::GET, "/v1.43/nodes").err().is_some_and(|e| e.1.contains("Maximum supported API version is 1.41")));
        assert_eq!(route(&Method::GET, "/v1.12/nodes").map_err(|e| e.0), Err(400));
        assert_eq!(route(&Method::GET, "/containers/json").map_err(|e| e.0), Err(404));
        let e = route(&Method::POST, "/v1.41/services/create").expect_err("a write");
        assert_eq!(e.0, 501);
        assert!(e.1.contains("swarmnet service create"), "{}", e.1);
        assert!(route(&Method::DELETE, "/services/web").expect_err("rm").1.contains("swarmnet service rm"));
        assert!(route(&Method::POST, "/nodes/x/update").expect_err("update").1.contains("swarmnet node update"));
    }

    #[test]
    fn filters_read_both_of_dockers_encodings() {
        let q = query(Some("filters=%7B%22name%22%3A%7B%22web%22%3Atrue%7D%7D&status=true"));
        assert_eq!(q.get("status").map(String::as_str), Some("true"));
        let f = filters(&q).expect("filters");
        assert_eq!(f.get("name"), Some(&vec!["web".to_string()]));
        let q = query(Some("filters={\"service\":[\"web\",\"db\"]}"));
        assert_eq!(filters(&q).expect("old").get("service").map(Vec::len), Some(2));
        assert_eq!(filters(&query(Some("filters=nope"))).map_err(|e| e.0), Err(400));
        assert!(filters(&query(None)).expect("none").is_empty());
    }

    fn task(id: &str, service: Option<&str>, node: &str) -> TaskInfo {
        TaskInfo {
            id: id.into(),
            name: "web.1".into(),
            node: node.into(),
            node_id: Some(format!("id-{node}")),
            desired_state: swarmnet_api::DesiredState::Running,
            state: swarmnet_api::TaskState::Running,
            error: String::new(),
            addresses: [("appnet".to_string(), "10.0.1.5".parse().expect("ip"))].into(),
            pid: Some(42),
            restarts: 0,
            version: 0,
            orphaned: false,
            service_id: service.map(Into::into),
            slot: Some(1),
            since_ms: 1_700_000_000_000,
        }
    }

    fn net() -> NetworkInfo {
        NetworkInfo {
            id: "nid".into(),
            name: "appnet".into(),
            driver: swarmnet_types::Driver::Overlay,
            scope: swarmnet_api::replies::Scope::Swarm,
            attachable: true,
            subnet: "10.0.1.0/24".parse().expect("net"),
            gateway: "10.0.1.1".parse().expect("gw"),
            vni: 4097,
            ingress: false,
        }
    }

    #[test]
    fn a_task_reads_as_docker_writes_it() {
        let t = task_json(&task("t1", Some("s1"), "n1"), None, &[net()]);
        assert_eq!(t["Status"]["State"], "running");
        assert_eq!(t["DesiredState"], "running");
        assert_eq!(t["Slot"], 1);
        assert_eq!(t["ServiceID"], "s1");
        assert_eq!(t["NodeID"], "id-n1");
        assert_eq!(t["NetworksAttachments"][0]["Addresses"][0], "10.0.1.5/24");
        assert_eq!(t["NetworksAttachments"][0]["Network"]["ID"], "nid");
        assert_eq!(t["Status"]["Timestamp"], "2023-11-14T22:13:20.000Z");
        assert_eq!(t["Status"]["ContainerStatus"]["PID"], 42);
        let n = network_json(&net());
        assert_eq!(n["IPAM"]["Config"][0]["Subnet"], "10.0.1.0/24");
        assert_eq!(n["Scope"], "swarm");
    }

    #[test]
    fn tasks_filter_by_service_node_and_desired_state() {
        let tasks = vec![task("t1", Some("s1"), "n1"), task("t2", Some("s2"), "n2"), task("t3", None, "n1")];
        let f: Filters = [("service".to_string(), vec!["s1".to_string()])].into();
        assert_eq!(select_tasks(&tasks, &[], &f).expect("service").len(), 0, "no such service known");
        let f: Filters = [("node".to_string(), vec!["n1".to_string()])].into();
        assert_eq!(select_tasks(&tasks, &[], &f).expect("node").iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t1", "t3"]);
        let f: Filters = [("desired-state".to_string(), vec!["shutdown".to_string()])].into();
        assert!(select_tasks(&tasks, &[], &f).expect("desired").is_empty());
        let f: Filters = [("bogus".to_string(), vec!["x".to_string()])].into();
        assert_eq!(select_tasks(&tasks, &[], &f).map_err(|e| e.0).err(), Some(400));
    }
}
