//! The cluster's vocabulary as the API speaks it: roles, states, endpoint modes, what an
//! agent reports of a task, and the specs of the requests that create objects.

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use swarmnet_types::{Driver, Id, Protocol, PublishMode};

use crate::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
}

impl std::str::FromStr for Role {
    type Err = ApiError;

    fn from_str(s: &str) -> Result<Role, ApiError> {
        match s {
            "manager" => Ok(Role::Manager),
            "worker" => Ok(Role::Worker),
            other => Err(ApiError::invalid(format!("role {other:?}: expected worker or manager"))),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    Vip,
    Dnsrr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    Running,
    Shutdown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Not yet placed on a node or not yet given its addresses.
    Pending,
    /// Sent to its node, not yet reported running.
    Assigned,
    /// The process runs; it does not yet listen on its service's ports, and takes no
    /// connections and is in no DNS answer until it does (or a bound passes).
    Starting,
    Running,
    /// The process exited with status 0 (standalone tasks).
    Complete,
    /// The process exited with an error or could not be started.
    Failed,
    /// Stopped on purpose.
    Shutdown,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Complete | TaskState::Failed | TaskState::Shutdown)
    }
}

/// What an agent says of one of its tasks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReport {
    pub task_id: Id,
    pub state: TaskState,
    pub error: String,
    pub pid: Option<u32>,
    pub restarts: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkCreate {
    pub name: String,
    pub driver: Driver,
    pub attachable: bool,
    pub subnet: Option<Ipv4Network>,
    /// The cluster's ingress network (there is one at most; the manager makes it).
    #[serde(default)]
    pub ingress: bool,
}

/// How many tasks a service runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum ServiceMode {
    /// `replicas` tasks, placed by the scheduler.
    Replicated { replicas: u64 },
    /// One task on every ready node.
    Global,
}

impl ServiceMode {
    pub fn name(self) -> &'static str {
        match self {
            ServiceMode::Replicated { .. } => "replicated",
            ServiceMode::Global => "global",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCreate {
    pub name: String,
    #[serde(flatten)]
    pub mode: ServiceMode,
    pub networks: Vec<NetworkAttach>,
    pub endpoint_mode: EndpointMode,
    pub publish: Vec<PublishSpec>,
    pub command: Vec<String>,
    /// Where its tasks may run (`--constraint`, all of them must hold).
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// `--label K=V`: the service's own labels (shown by inspect).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// `--env K=V`: the tasks' environment variables (beside swarmnet's own).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub update: UpdateConfig,
}

/// How a service's tasks are replaced when its spec changes: `parallelism` at a time (0: all
/// at once), each new task running (ready) before the one it replaces drains and stops,
/// then `delay_ms` before the next. Docker's `--update-parallelism` and `--update-delay`,
/// with its `--update-order start-first`, so the service never has fewer tasks running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateConfig {
    pub parallelism: u64,
    pub delay_ms: u64,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig { parallelism: 1, delay_ms: 0 }
    }
}

/// Where a service's rolling update is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    pub message: String,
    /// No new task is started before this (unix ms): the `--update-delay` after the last
    /// task replaced.
    #[serde(default)]
    pub not_before_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateState {
    Updating,
    /// A new task failed: it was stopped, the old ones go on running; another `service
    /// update` (`--force` to change nothing else) starts again.
    Paused,
    Completed,
}

/// `service update`: what changes. Empty fields change nothing. A new command, a changed
/// environment or constraints, or `force`, replace the tasks as a rolling update; replicas,
/// labels, ports and the update settings do not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceUpdate {
    pub publish_add: Vec<PublishSpec>,
    pub publish_rm: Vec<PublishedPort>,
    pub replicas: Option<u64>,
    pub command: Option<Vec<String>>,
    pub env_add: std::collections::BTreeMap<String, String>,
    pub env_rm: Vec<String>,
    pub constraint_add: Vec<Constraint>,
    pub constraint_rm: Vec<Constraint>,
    pub label_add: std::collections::BTreeMap<String, String>,
    pub label_rm: Vec<String>,
    pub parallelism: Option<u64>,
    pub delay_ms: Option<u64>,
    /// Replace the tasks even with nothing else changed.
    pub force: bool,
}

impl ServiceUpdate {
    pub fn is_empty(&self) -> bool {
        *self == ServiceUpdate::default()
    }
}

/// One `--env K=V`: a key of letters, digits and `_` not starting with a digit (what a shell
/// can name), any value without a NUL.
pub fn parse_env(arg: &str) -> Result<(String, String), ApiError> {
    let Some((k, v)) = arg.split_once('=') else {
        return Err(ApiError::invalid(format!("invalid environment variable {arg:?}: expected KEY=VALUE")));
    };
    check_env_key(k).map_err(|e| ApiError::invalid(format!("invalid environment variable {arg:?}: {}", e.message)))?;
    if v.contains('\0') {
        return Err(ApiError::invalid(format!("invalid environment variable {arg:?}: the value has a NUL byte")));
    }
    Ok((k.to_string(), v.to_string()))
}

pub fn check_env_key(k: &str) -> Result<(), ApiError> {
    let ok = !k.is_empty() && k.len() <= 256 && !k.starts_with(|c: char| c.is_ascii_digit()) && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err(ApiError::invalid(format!("key {k:?}: expected letters, digits and _, not starting with a digit")));
    }
    Ok(())
}

/// What a `--constraint` looks at on a node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum ConstraintKey {
    /// `node.labels.NAME`
    Label(String),
    /// `node.hostname`
    Hostname,
    /// `node.id`
    Id,
    /// `node.role` (`manager` or `worker`)
    Role,
}

/// One `--constraint`: `node.labels.K==V`, `node.hostname==H`, `node.id==ID` or
/// `node.role==manager|worker`, each also with `!=` (Docker's placement constraints).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Constraint {
    pub key: ConstraintKey,
    /// `==` (true) or `!=` (false).
    pub equal: bool,
    pub value: String,
}

impl Constraint {
    /// Whether a node with these attributes satisfies it. A label the node lacks is not
    /// equal to any value.
    pub fn holds(&self, id: &str, hostname: &str, role: Role, labels: &std::collections::BTreeMap<String, String>) -> bool {
        let actual = match &self.key {
            ConstraintKey::Label(k) => labels.get(k).map(String::as_str),
            ConstraintKey::Hostname => Some(hostname),
            ConstraintKey::Id => Some(id),
            ConstraintKey::Role => Some(match role {
                Role::Manager => "manager",
                Role::Worker => "worker",
            }),
        };
        (actual == Some(self.value.as_str())) == self.equal
    }
}

impl std::str::FromStr for Constraint {
    type Err = ApiError;

    fn from_str(arg: &str) -> Result<Constraint, ApiError> {
        let bad = |why: &str| {
            ApiError::invalid(format!("invalid --constraint {arg:?}: {why} (expected node.labels.KEY==VALUE, node.hostname==NAME, node.id==ID or node.role==manager|worker, or != for any)"))
        };
        let (lhs, equal, value) = match (arg.split_once("!="), arg.split_once("==")) {
            (Some((l, v)), _) => (l, false, v),
            (None, Some((l, v))) => (l, true, v),
            (None, None) => return Err(bad("no == or !=")),
        };
        let (lhs, value) = (lhs.trim(), value.trim());
        if value.is_empty() {
            return Err(bad("no value"));
        }
        let key = match lhs {
            "node.hostname" => ConstraintKey::Hostname,
            "node.id" => ConstraintKey::Id,
            "node.role" => {
                value.parse::<Role>().map_err(|_| bad("node.role is manager or worker"))?;
                ConstraintKey::Role
            }
            l => match l.strip_prefix("node.labels.") {
                Some(k) => {
                    check_label_key(k).map_err(|e| bad(&e.message))?;
                    ConstraintKey::Label(k.to_string())
                }
                None => return Err(bad(&format!("unknown key {l:?}"))),
            },
        };
        Ok(Constraint { key, equal, value: value.to_string() })
    }
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            ConstraintKey::Label(k) => write!(f, "node.labels.{k}")?,
            ConstraintKey::Hostname => f.write_str("node.hostname")?,
            ConstraintKey::Id => f.write_str("node.id")?,
            ConstraintKey::Role => f.write_str("node.role")?,
        }
        write!(f, "{}{}", if self.equal { "==" } else { "!=" }, self.value)
    }
}

/// A label's key: 1 to 128 characters, none of them `=`, whitespace or a control character.
pub fn check_label_key(k: &str) -> Result<(), ApiError> {
    if k.is_empty() || k.len() > 128 || k.chars().any(|c| c == '=' || c.is_whitespace() || c.is_control()) {
        return Err(ApiError::invalid(format!("label key {k:?}: expected 1 to 128 characters, without '=' or spaces")));
    }
    Ok(())
}

/// One `--label K=V` (or `K`, an empty value).
pub fn parse_label(arg: &str) -> Result<(String, String), ApiError> {
    let (k, v) = arg.split_once('=').unwrap_or((arg, ""));
    check_label_key(k).map_err(|e| ApiError::invalid(format!("invalid label {arg:?}: {}", e.message)))?;
    if v.len() > 1024 || v.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!("invalid label {arg:?}: the value is at most 1024 characters, none of them control characters")));
    }
    Ok((k.to_string(), v.to_string()))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandaloneCreate {
    pub name: String,
    pub networks: Vec<NetworkAttach>,
    pub command: Vec<String>,
}

/// One `--network`: `NAME`, or `name=NAME[,alias=ALIAS]…` (Docker's long form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAttach {
    /// The network's name or id.
    pub name: String,
    /// Extra names of the service (or task) on it.
    #[serde(default)]
    pub aliases: Vec<String>,
}

impl std::str::FromStr for NetworkAttach {
    type Err = ApiError;

    fn from_str(arg: &str) -> Result<NetworkAttach, ApiError> {
        if !arg.contains('=') {
            check_name("network", arg)?;
            return Ok(NetworkAttach { name: arg.to_string(), aliases: Vec::new() });
        }
        let mut name = None;
        let mut aliases: Vec<String> = Vec::new();
        for part in arg.split(',') {
            match part.split_once('=') {
                Some(("name" | "network", v)) if !v.is_empty() => name = Some(v.to_string()),
                Some(("alias", v)) => {
                    check_name("alias", v)?;
                    if !aliases.iter().any(|a| a.eq_ignore_ascii_case(v)) {
                        aliases.push(v.to_string());
                    }
                }
                _ => return Err(ApiError::invalid(format!("invalid --network {arg:?}: expected NAME or name=NAME[,alias=ALIAS]... (unknown part {part:?})"))),
            }
        }
        let name = name.ok_or_else(|| ApiError::invalid(format!("invalid --network {arg:?}: no name=NETWORK in it")))?;
        check_name("network", &name)?;
        Ok(NetworkAttach { name, aliases })
    }
}

/// Docker's rule for object names: a letter or digit, then letters, digits, `_`, `.`, `-`;
/// 63 characters at most.
pub fn check_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("invalid {kind} name {name:?}: use 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit")))
    }
}

/// One `--publish` as given: the published port may be left to the manager (a free one of
/// 30000–32767).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishSpec {
    pub published: Option<u16>,
    pub target: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: PublishMode,
}

impl PublishSpec {
    /// What the manager checks again (a spec may come from any client): ports are 1–65535.
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.target == 0 || self.published == Some(0) {
            return Err(ApiError::invalid(format!("invalid published port {self}: ports are 1 to 65535")));
        }
        Ok(())
    }
}

impl std::fmt::Display for PublishSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.published {
            Some(p) => write!(f, "published={p},target={},protocol={},mode={}", self.target, self.protocol, self.mode),
            None => write!(f, "target={},protocol={},mode={}", self.target, self.protocol, self.mode),
        }
    }
}

const PUBLISH_FORMS: &str = "expected PUBLISHED:TARGET[/tcp|/udp], TARGET, or published=P,target=T,protocol=tcp|udp,mode=ingress|host";

impl std::str::FromStr for PublishSpec {
    type Err = ApiError;

    /// `PUBLISHED:TARGET[/tcp|/udp]`, `TARGET[/tcp|/udp]`, or the long form
    /// `published=P,target=T,protocol=tcp|udp,mode=ingress|host`.
    fn from_str(s: &str) -> Result<PublishSpec, ApiError> {
        let bad = |why: &str| ApiError::invalid(format!("invalid --publish {s:?}: {why} ({PUBLISH_FORMS})"));
        let port = |v: &str, what: &str| -> Result<u16, ApiError> {
            match v.parse::<u32>() {
                Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
                _ => Err(bad(&format!("{what} port {v:?} is not 1 to 65535"))),
            }
        };
        let protocol = |v: &str| match v {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => Err(bad(&format!("protocol {other:?} is not tcp or udp"))),
        };
        if s.contains('=') {
            let (mut published, mut target, mut proto, mut mode) = (None, None, Protocol::Tcp, PublishMode::Ingress);
            for part in s.split(',') {
                match part.split_once('=') {
                    Some(("published", v)) => published = Some(port(v, "published")?),
                    Some(("target", v)) => target = Some(port(v, "target")?),
                    Some(("protocol", v)) => proto = protocol(v)?,
                    Some(("mode", "ingress")) => mode = PublishMode::Ingress,
                    Some(("mode", "host")) => mode = PublishMode::Host,
                    Some(("mode", v)) => return Err(bad(&format!("mode {v:?} is not ingress or host"))),
                    _ => return Err(bad(&format!("unknown part {part:?}"))),
                }
            }
            let target = target.ok_or_else(|| bad("no target=PORT"))?;
            return Ok(PublishSpec { published, target, protocol: proto, mode });
        }
        let (ports, proto) = match s.split_once('/') {
            Some((p, v)) => (p, protocol(v)?),
            None => (s, Protocol::Tcp),
        };
        let (published, target) = match ports.split_once(':') {
            Some((p, t)) => (Some(port(p, "published")?), port(t, "target")?),
            None => (None, port(ports, "target")?),
        };
        Ok(PublishSpec { published, target, protocol: proto, mode: PublishMode::Ingress })
    }
}

/// A published port of a service, as `--publish-rm` names it: `PUBLISHED[/tcp|/udp]` (no
/// protocol: either).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    pub published: u16,
    pub protocol: Option<Protocol>,
}

impl std::fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.protocol {
            Some(p) => write!(f, "{}/{p}", self.published),
            None => write!(f, "{}", self.published),
        }
    }
}

impl std::str::FromStr for PublishedPort {
    type Err = ApiError;

    fn from_str(r: &str) -> Result<PublishedPort, ApiError> {
        let bad = || ApiError::invalid(format!("invalid --publish-rm {r:?}: expected PUBLISHED[/tcp|/udp]"));
        let (p, protocol) = match r.split_once('/') {
            Some((p, "tcp")) => (p, Some(Protocol::Tcp)),
            Some((p, "udp")) => (p, Some(Protocol::Udp)),
            Some(_) => return Err(bad()),
            None => (r, None),
        };
        let published: u16 = p.parse().map_err(|_| bad())?;
        if published == 0 {
            return Err(bad());
        }
        Ok(PublishedPort { published, protocol })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_parse_match_and_refuse_what_they_do_not_know() {
        let labels: std::collections::BTreeMap<String, String> = [("zone".to_string(), "a".to_string())].into();
        let c: Constraint = "node.labels.zone==a".parse().expect("label");
        assert!(c.holds("n1", "h1", Role::Worker, &labels));
        assert!(!c.holds("n1", "h1", Role::Worker, &Default::default()), "a missing label is not equal");
        let c: Constraint = "node.labels.zone != a".parse().expect("label !=");
        assert!(!c.holds("n1", "h1", Role::Worker, &labels) && c.holds("n1", "h1", Role::Worker, &Default::default()));
        assert_eq!(c.to_string(), "node.labels.zone!=a");
        assert!("node.hostname==h1".parse::<Constraint>().expect("hostname").holds("n1", "h1", Role::Worker, &labels));
        assert!("node.id!=n2".parse::<Constraint>().expect("id").holds("n1", "h1", Role::Worker, &labels));
        assert!("node.role==manager".parse::<Constraint>().expect("role").holds("n1", "h1", Role::Manager, &labels));
        for bad in ["node.color==red", "node.labels.==x", "node.labels.zone", "node.role==boss", "node.hostname==", "engine.labels.x==y"] {
            let e = bad.parse::<Constraint>().expect_err(bad);
            assert!(e.message.contains("invalid --constraint"), "{bad}: {}", e.message);
        }
        assert_eq!(parse_label("tier=front").expect("label"), ("tier".into(), "front".into()));
        assert_eq!(parse_label("gpu").expect("bare"), ("gpu".into(), String::new()));
        assert!(parse_label("=x").is_err() && parse_label("a b=c").is_err());
    }

    #[test]
    fn publish_specs_parse_in_every_form_and_bad_ones_say_why() {
        let p = |s: &str| s.parse::<PublishSpec>().expect(s);
        let spec = |published, target, protocol, mode| PublishSpec { published, target, protocol, mode };
        assert_eq!(p("8080:80"), spec(Some(8080), 80, Protocol::Tcp, PublishMode::Ingress));
        assert_eq!(p("8080:80/udp"), spec(Some(8080), 80, Protocol::Udp, PublishMode::Ingress));
        assert_eq!(p("80"), spec(None, 80, Protocol::Tcp, PublishMode::Ingress));
        assert_eq!(p("published=9000,target=80,protocol=udp,mode=host"), spec(Some(9000), 80, Protocol::Udp, PublishMode::Host));
        assert_eq!(p("target=80"), spec(None, 80, Protocol::Tcp, PublishMode::Ingress));
        for (bad, why) in [
            ("70000:80", "published port \"70000\" is not 1 to 65535"),
            ("0:80", "published port \"0\" is not 1 to 65535"),
            ("8080:80/sctp", "protocol \"sctp\" is not tcp or udp"),
            ("published=8080", "no target=PORT"),
            ("target=80,mode=bridge", "mode \"bridge\" is not ingress or host"),
            ("target=80,color=red", "unknown part \"color=red\""),
        ] {
            let e = bad.parse::<PublishSpec>().expect_err(bad);
            assert_eq!(e.kind, crate::ErrorKind::Invalid);
            assert!(e.message.contains(why), "{bad}: {e}");
        }
        // Through JSON and back (the wire), and checked again by whoever receives it.
        let s = p("published=9000,target=80,protocol=udp,mode=host");
        assert_eq!(serde_json::from_str::<PublishSpec>(&serde_json::to_string(&s).expect("json")).expect("back"), s);
        assert!(PublishSpec { published: Some(0), target: 80, protocol: Protocol::Tcp, mode: PublishMode::Ingress }.validate().is_err());
        assert!(s.validate().is_ok());
    }

    #[test]
    fn published_ports_and_network_attachments_parse() {
        assert_eq!("8080".parse::<PublishedPort>().expect("port"), PublishedPort { published: 8080, protocol: None });
        assert_eq!("53/udp".parse::<PublishedPort>().expect("port"), PublishedPort { published: 53, protocol: Some(Protocol::Udp) });
        assert!("53/sctp".parse::<PublishedPort>().is_err() && "x".parse::<PublishedPort>().is_err() && "0".parse::<PublishedPort>().is_err());
        assert_eq!("appnet".parse::<NetworkAttach>().expect("net"), NetworkAttach { name: "appnet".into(), aliases: vec![] });
        assert_eq!("name=appnet,alias=v1,alias=V1".parse::<NetworkAttach>().expect("net"), NetworkAttach { name: "appnet".into(), aliases: vec!["v1".into()] });
        assert!("name=appnet,color=red".parse::<NetworkAttach>().is_err());
        assert!("alias=x".parse::<NetworkAttach>().is_err());
        assert!("-bad".parse::<NetworkAttach>().is_err());
    }

    #[test]
    fn env_vars_are_what_a_shell_can_name() {
        assert_eq!(parse_env("LOG_LEVEL=debug=yes").expect("env"), ("LOG_LEVEL".into(), "debug=yes".into()));
        assert_eq!(parse_env("_X=").expect("empty value"), ("_X".into(), String::new()));
        for bad in ["LOG", "=v", "1X=v", "A-B=v", "A B=v", "A=\0"] {
            assert!(parse_env(bad).is_err(), "{bad}");
        }
        assert!(ServiceUpdate::default().is_empty());
        assert!(!ServiceUpdate { force: true, ..Default::default() }.is_empty());
    }

    #[test]
    fn a_service_spec_is_typed_on_the_wire() {
        let spec = ServiceCreate {
            name: "web".into(),
            mode: ServiceMode::Replicated { replicas: 3 },
            networks: vec!["appnet".parse().expect("net")],
            endpoint_mode: EndpointMode::Vip,
            publish: vec!["8080:80".parse().expect("publish")],
            command: vec!["sleep".into()],
            constraints: vec!["node.labels.zone==a".parse().expect("constraint")],
            labels: [("tier".to_string(), "front".to_string())].into(),
            env: [("LOG".to_string(), "debug".to_string())].into(),
            update: UpdateConfig { parallelism: 2, delay_ms: 5000 },
        };
        let v = serde_json::to_value(&spec).expect("json");
        assert_eq!(v["update"]["delay_ms"], 5000);
        assert_eq!(v["mode"], "replicated");
        assert_eq!(v["replicas"], 3);
        assert_eq!(v["publish"][0]["protocol"], "tcp");
        assert_eq!(serde_json::from_value::<ServiceCreate>(v).expect("back"), spec);
        let global: ServiceCreate = serde_json::from_value(serde_json::json!({"name":"g","mode":"global","networks":[],"endpoint_mode":"vip","publish":[],"command":["x"]})).expect("global");
        assert_eq!((global.mode, global.update), (ServiceMode::Global, UpdateConfig::default()), "older clients' specs decode");
        // A mode that does not exist is refused by the decoder, not guessed.
        assert!(serde_json::from_value::<ServiceCreate>(serde_json::json!({"name":"g","mode":"sideways","networks":[],"endpoint_mode":"vip","publish":[],"command":["x"]})).is_err());
    }
}
