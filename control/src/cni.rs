//! The CNI plugin (issue 22): the `swarmnet` binary run by a container runtime with
//! `CNI_COMMAND` in its environment and the network's conf on stdin (CNI 1.0.0, and the
//! versions before it that have the same result shape). It asks the node's daemon, over its
//! control socket, to attach or detach the container, and turns the answer into the CNI
//! result or error JSON. `swarmnet cni install` puts the binary and the confs in place.
//!
//! Parsing the conf and the environment, and building results and errors, are pure.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{json, Value};
use swarmnet_api::cni::{CniAttached, CniGc, CniRemoved, CniRequest};
use swarmnet_api::{ApiError, ApiRequest, ErrorKind, Reply};

/// The versions whose result this plugin writes (0.3.x and 0.4.0 differ from 1.0.0 only by
/// the `version` of each IP; 1.1.0 adds GC and STATUS, answered below).
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The spec's error codes this plugin uses.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// swarmnet's own (the spec leaves 100 and up to plugins): the container's interface
    /// could not be made, or CHECK found it drifted.
    pub const ATTACH_FAILED: u32 = 100;
    pub const DRIFT: u32 = 101;
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: what the plugin prints (on stdout, exit 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    pub fn json(&self, version: &str) -> Value {
        let mut v = json!({ "cniVersion": version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

/// The environment a runtime runs the plugin with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    /// `CNI_ARGS`: `K=V;K=V`.
    pub args: BTreeMap<String, String>,
}

impl Env {
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Env {
        let args = get("CNI_ARGS").unwrap_or_default().split(';').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
        Env {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").filter(|s| !s.is_empty()),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args,
        }
    }
}

/// The network conf as this plugin reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Conf {
    pub cni_version: String,
    /// The conf's `name` (the network's name in the runtime).
    pub name: String,
    /// swarmnet's network (its name or id): `network`, else `name`.
    pub network: String,
    /// The daemon's control socket: `socket`, else the default.
    pub socket: Option<PathBuf>,
    pub runtime_config: Value,
    pub prev_result: Option<Value>,
    /// CNI GC's `cni.dev/valid-attachments`: (container id, interface); None: not given.
    pub valid: Option<Vec<(String, String)>>,
}

/// Reads the conf from stdin's bytes.
pub fn parse_conf(raw: &[u8]) -> Result<Conf, CniError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(CniError::new(code::DECODE, "no network configuration on stdin"));
    }
    let v: Value = serde_json::from_slice(raw).map_err(|e| CniError::new(code::DECODE, format!("the network configuration on stdin is not JSON: {e}")))?;
    let Some(o) = v.as_object() else { return Err(CniError::new(code::DECODE, "the network configuration on stdin is not a JSON object")) };
    let s = |k: &str| -> Result<Option<String>, CniError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(CniError::new(code::INVALID_CONFIG, format!("{k}: expected a string, got {other}"))),
        }
    };
    let cni_version = s("cniVersion")?.ok_or_else(|| CniError::new(code::INVALID_CONFIG, "cniVersion is missing"))?;
    if !SUPPORTED.contains(&cni_version.as_str()) {
        let mut e = CniError::new(code::INCOMPATIBLE_VERSION, format!("cniVersion {cni_version} is not supported"));
        e.details = format!("supported: {}", SUPPORTED.join(", "));
        return Err(e);
    }
    let name = s("name")?.ok_or_else(|| CniError::new(code::INVALID_CONFIG, "name is missing"))?;
    let network = s("network")?.unwrap_or_else(|| name.clone());
    if network.is_empty() {
        return Err(CniError::new(code::INVALID_CONFIG, "network is empty: name the swarmnet network to attach to"));
    }
    let valid = match o.get("cni.dev/valid-attachments") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| Some((x.get("containerID")?.as_str()?.to_string(), x.get("ifname")?.as_str()?.to_string())))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| CniError::new(code::DECODE, "cni.dev/valid-attachments: every entry needs containerID and ifname (strings)"))?,
        ),
        Some(other) => return Err(CniError::new(code::DECODE, format!("cni.dev/valid-attachments: expected an array, got {other}"))),
    };
    Ok(Conf {
        cni_version,
        name,
        network,
        socket: s("socket")?.map(PathBuf::from),
        runtime_config: o.get("runtimeConfig").cloned().unwrap_or(Value::Null),
        prev_result: o.get("prevResult").cloned(),
        valid,
    })
}

/// The container's name in the cluster's DNS: the runtime's for it (`K8S_POD_NAME` in
/// CNI_ARGS, `name` in runtimeConfig), else its id (its first 12 characters, Docker's short
/// id, if the whole id is no DNS label).
pub fn container_name(env: &Env, conf: &Conf) -> String {
    let given = env.args.get("K8S_POD_NAME").map(String::as_str).or_else(|| conf.runtime_config.get("name").and_then(Value::as_str));
    if let Some(n) = given.and_then(dns_label) {
        return n;
    }
    let id = &env.container_id;
    if id.len() <= 63 {
        id.clone()
    } else {
        id.chars().take(12).collect()
    }
}

/// `name` as a name the cluster's DNS takes (1-63 letters, digits, '_', '.', '-', starting
/// with a letter or digit): other characters become '-', the rest is cut at 63.
fn dns_label(name: &str) -> Option<String> {
    let cleaned: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' }).take(63).collect();
    let trimmed = cleaned.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

fn version_is_0x(v: &str) -> bool {
    v.starts_with("0.")
}

/// The ADD result: the attachment, after what earlier plugins of the chain gave
/// (`prevResult`), in the conf's version.
pub fn result(version: &str, a: &CniAttached, netns: &str, prev: Option<&Value>) -> Value {
    let mut interfaces: Vec<Value> = prev.and_then(|p| p.get("interfaces")).and_then(Value::as_array).cloned().unwrap_or_default();
    let mut ips: Vec<Value> = prev.and_then(|p| p.get("ips")).and_then(Value::as_array).cloned().unwrap_or_default();
    let mut routes: Vec<Value> = prev.and_then(|p| p.get("routes")).and_then(Value::as_array).cloned().unwrap_or_default();
    let base = interfaces.len();
    interfaces.push(json!({ "name": a.host_link, "mac": a.host_link_mac }));
    let mut ours = json!({ "name": a.ifname, "mac": a.mac, "sandbox": netns });
    if version == "1.1.0" {
        ours["mtu"] = json!(a.mtu);
    }
    interfaces.push(ours);
    interfaces.push(json!({ "name": a.container_link, "mac": a.container_link_mac, "sandbox": netns }));
    if !a.host_if.is_empty() {
        interfaces.push(json!({ "name": a.host_if, "mac": a.host_if_mac }));
    }
    let mut ip = json!({ "address": format!("{}/{}", a.address, a.prefix), "gateway": a.gateway.to_string(), "interface": base + 1 });
    if version_is_0x(version) {
        ip["version"] = json!("4");
    }
    ips.push(ip);
    for r in &a.routes {
        let mut v = json!({ "dst": r.dst });
        if let Some(gw) = r.gw {
            v["gw"] = json!(gw.to_string());
        }
        routes.push(v);
    }
    let mut dns = prev.and_then(|p| p.get("dns")).cloned().unwrap_or_else(|| json!({}));
    for (k, ours) in [("nameservers", &a.nameservers), ("search", &a.search), ("options", &a.options)] {
        let mut l: Vec<Value> = dns.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
        for x in ours {
            if !l.iter().any(|y| y.as_str() == Some(x)) {
                l.push(json!(x));
            }
        }
        if !l.is_empty() {
            dns[k] = json!(l);
        }
    }
    json!({ "cniVersion": version, "interfaces": interfaces, "ips": ips, "routes": routes, "dns": dns })
}

/// The CNI code for a refusal of the daemon (or the manager behind it).
pub fn code_for(kind: ErrorKind, command: &str) -> u32 {
    match kind {
        ErrorKind::Unavailable | ErrorKind::NotLeader | ErrorKind::Timeout => code::TRY_AGAIN_LATER,
        ErrorKind::NotFound if command == "CHECK" => code::UNKNOWN_CONTAINER,
        ErrorKind::NotFound | ErrorKind::Invalid => code::INVALID_CONFIG,
        ErrorKind::Conflict if command == "CHECK" => code::DRIFT,
        ErrorKind::Conflict => code::ATTACH_FAILED,
        ErrorKind::NotManager | ErrorKind::Refused | ErrorKind::Internal => code::INTERNAL,
    }
}

/// Whether this process was started as a CNI plugin (a runtime sets `CNI_COMMAND` and
/// passes no arguments).
pub fn invoked_as_plugin() -> bool {
    std::env::var_os("CNI_COMMAND").is_some() && std::env::args_os().len() == 1
}

/// The plugin: reads its input, acts, prints the result or the error.
pub fn plugin_main() -> ExitCode {
    let env = Env::from_vars(|k| std::env::var(k).ok());
    let mut raw = Vec::new();
    let read = std::io::stdin().read_to_end(&mut raw);
    let version = serde_json::from_slice::<Value>(&raw)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
        .filter(|v| SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".into());
    let out = match read {
        Err(e) => Err(CniError::new(code::IO, format!("read stdin: {e}"))),
        Ok(_) => run(&env, &raw, &version),
    };
    match out {
        Ok(Some(v)) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", e.json(&version));
            ExitCode::from(1)
        }
    }
}

/// One command; `version`: the conf's cniVersion if it is one this plugin speaks, else
/// 1.0.0 (what VERSION and errors answer in).
fn run(env: &Env, raw: &[u8], version: &str) -> Result<Option<Value>, CniError> {
    if env.command == "VERSION" {
        return Ok(Some(json!({ "cniVersion": version, "supportedVersions": SUPPORTED })));
    }
    let conf = parse_conf(raw)?;
    let socket = conf.socket.clone().unwrap_or_else(|| crate::daemon::control_socket(Path::new(crate::DEFAULT_DATA_DIR)));
    let need = |what: &str, v: &str| if v.is_empty() { Err(CniError::new(code::INVALID_ENV, format!("{what} is not set"))) } else { Ok(()) };
    let req = |env: &Env| CniRequest {
        network: conf.network.clone(),
        conf_name: conf.name.clone(),
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        name: container_name(env, &conf),
    };
    match env.command.as_str() {
        "ADD" => {
            need("CNI_CONTAINERID", &env.container_id)?;
            need("CNI_IFNAME", &env.ifname)?;
            let netns = env.netns.clone().ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is not set: ADD needs the container's network namespace"))?;
            swarmnet_dataplane::cni::ns_id(Path::new(&netns)).map_err(|e| CniError::new(code::INVALID_ENV, format!("CNI_NETNS {netns}: {e}")))?;
            let a: CniAttached = ask(&socket, ApiRequest::CniAdd { req: req(env) }, "ADD")?;
            Ok(Some(result(&conf.cni_version, &a, &netns, conf.prev_result.as_ref())))
        }
        "CHECK" => {
            if version_is_0x(&conf.cni_version) && conf.cni_version != "0.4.0" {
                return Err(CniError::new(code::INCOMPATIBLE_VERSION, format!("cniVersion {} has no CHECK", conf.cni_version)));
            }
            need("CNI_CONTAINERID", &env.container_id)?;
            need("CNI_IFNAME", &env.ifname)?;
            let a: CniAttached = ask(&socket, ApiRequest::CniCheck { req: req(env) }, "CHECK")?;
            // The runtime's record of the result must still say what is attached.
            if let Some(prev) = &conf.prev_result {
                let want = format!("{}/{}", a.address, a.prefix);
                let listed = prev.get("ips").and_then(Value::as_array).is_some_and(|ips| ips.iter().any(|i| i.get("address").and_then(Value::as_str) == Some(want.as_str())));
                if !listed {
                    return Err(CniError::new(code::DRIFT, format!("container {}: the runtime's prevResult does not list {want}, which is attached", env.container_id)));
                }
            }
            Ok(None)
        }
        "DEL" => {
            need("CNI_CONTAINERID", &env.container_id)?;
            need("CNI_IFNAME", &env.ifname)?;
            let _: CniRemoved = ask(&socket, ApiRequest::CniDel { req: req(env) }, "DEL")?;
            Ok(None)
        }
        "GC" => {
            // Without the list, every attachment would look stale: refused, not guessed.
            let valid = conf.valid.clone().ok_or_else(|| CniError::new(code::INVALID_CONFIG, "GC needs cni.dev/valid-attachments"))?;
            let _: CniRemoved = ask(&socket, ApiRequest::CniGc { spec: CniGc { conf_name: conf.name.clone(), valid } }, "GC")?;
            Ok(None)
        }
        "STATUS" => match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(_) => Ok(None),
            Err(e) => Err(CniError::new(code::NOT_AVAILABLE, format!("the swarmnet daemon at {} cannot be reached: {e}", socket.display()))),
        },
        "" => Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
        other => Err(CniError::new(code::INVALID_ENV, format!("CNI_COMMAND {other}: unknown command"))),
    }
}

/// One request to the daemon at `socket`, its refusal as a CNI error.
fn ask<T: serde::de::DeserializeOwned>(socket: &Path, req: ApiRequest, command: &str) -> Result<T, CniError> {
    let unreachable = |e: &dyn std::fmt::Display| CniError::new(code::TRY_AGAIN_LATER, format!("the swarmnet daemon at {} cannot be reached: {e}", socket.display()));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| CniError::new(code::INTERNAL, format!("tokio: {e}")))?;
    let reply: Reply = rt.block_on(async {
        let mut s = tokio::net::UnixStream::connect(socket).await.map_err(|e| unreachable(&e))?;
        swarmnet_api::write_msg(&mut s, &req).await.map_err(|e| unreachable(&e))?;
        swarmnet_api::read_msg(&mut s).await.map_err(|e| unreachable(&e))?.ok_or_else(|| unreachable(&"it closed the connection without answering"))
    })?;
    reply.into_data().map_err(|e| {
        let e: ApiError = e.into_api();
        CniError::new(code_for(e.kind, command), e.message)
    })
}

/// `swarmnet cni install`: the plugin binary into `bin_dir` (as `swarmnet`, the conf's
/// `type`), and a conflist per attachable network (or the one named) into `conf_dir`.
/// Returns the files written.
pub fn install(host: &Option<String>, bin_dir: &Path, conf_dir: &Path, network: Option<&str>) -> anyhow::Result<Vec<PathBuf>> {
    use anyhow::Context;
    let nets: Vec<swarmnet_api::replies::NetworkInfo> = crate::call(host, ApiRequest::NetworkLs)?;
    let chosen: Vec<&swarmnet_api::replies::NetworkInfo> = match network {
        Some(n) => {
            let net = nets.iter().find(|x| x.name == n || x.id == n).ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("network {n} not found")))?;
            if !net.attachable || net.ingress {
                return Err(ApiError::invalid(format!("network {n} is not attachable: create it with --attachable to attach containers to it")).into());
            }
            vec![net]
        }
        None => nets.iter().filter(|x| x.attachable && !x.ingress).collect(),
    };
    let socket = crate::socket_path(host)?;
    let default_socket = crate::daemon::control_socket(Path::new(crate::DEFAULT_DATA_DIR));
    let mut written = Vec::new();
    std::fs::create_dir_all(bin_dir).with_context(|| format!("create {}", bin_dir.display()))?;
    let exe = std::fs::read("/proc/self/exe").context("read this program (/proc/self/exe)")?;
    let bin = bin_dir.join("swarmnet");
    write_atomic(&bin, &exe, 0o755)?;
    written.push(bin);
    std::fs::create_dir_all(conf_dir).with_context(|| format!("create {}", conf_dir.display()))?;
    for n in chosen {
        let mut plugin = json!({ "type": "swarmnet", "network": n.name });
        if socket != default_socket {
            plugin["socket"] = json!(socket.display().to_string());
        }
        let list = json!({ "cniVersion": "1.0.0", "name": n.name, "plugins": [plugin] });
        let path = conf_dir.join(format!("10-swarmnet-{}.conflist", n.name));
        write_atomic(&path, format!("{}\n", serde_json::to_string_pretty(&list)?).as_bytes(), 0o644)?;
        written.push(path);
    }
    Ok(written)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("swarmnet-tmp");
    std::fs::write(&tmp, bytes).map_err(|e| anyhow::anyhow!("write {}: {e}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(|e| anyhow::anyhow!("chmod {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("rename {} to {}: {e}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use swarmnet_api::cni::CniRoute;

    fn attached() -> CniAttached {
        CniAttached {
            task_id: "t1".into(),
            name: "c1".into(),
            network: "appnet".into(),
            ifname: "eth0".into(),
            mac: "02:42:0a:00:01:05".into(),
            mtu: 1450,
            address: Ipv4Addr::new(10, 0, 1, 5),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 0, 1, 1),
            host_link: "snh0123".into(),
            host_link_mac: "aa:bb:cc:dd:ee:ff".into(),
            host_if: "sntabcdef0".into(),
            host_if_mac: "aa:bb:cc:dd:ee:00".into(),
            container_link: "swarmnet0".into(),
            container_link_mac: "aa:bb:cc:dd:ee:00".into(),
            routes: vec![CniRoute { dst: "10.0.1.0/24".into(), gw: None }, CniRoute { dst: "0.0.0.0/0".into(), gw: Some(Ipv4Addr::new(169, 254, 1, 1)) }],
            nameservers: vec!["127.0.0.11".into()],
            search: vec!["lab".into()],
            options: vec![],
        }
    }

    #[test]
    fn a_conf_names_its_network_and_bad_ones_get_the_specs_codes() {
        let c = parse_conf(br#"{"cniVersion":"1.0.0","name":"appnet","type":"swarmnet","network":"other","socket":"/run/x.sock"}"#).expect("conf");
        assert_eq!((c.network.as_str(), c.socket.as_deref()), ("other", Some(Path::new("/run/x.sock"))));
        assert_eq!(parse_conf(br#"{"cniVersion":"1.0.0","name":"appnet","type":"swarmnet"}"#).expect("conf").network, "appnet");
        assert_eq!(parse_conf(b"").map_err(|e| e.code), Err(code::DECODE));
        assert_eq!(parse_conf(b"{not json").map_err(|e| e.code), Err(code::DECODE));
        assert_eq!(parse_conf(b"[1]").map_err(|e| e.code), Err(code::DECODE));
        assert_eq!(parse_conf(br#"{"cniVersion":"9.9.9","name":"a"}"#).map_err(|e| e.code), Err(code::INCOMPATIBLE_VERSION));
        assert_eq!(parse_conf(br#"{"name":"a"}"#).map_err(|e| e.code), Err(code::INVALID_CONFIG));
        assert_eq!(parse_conf(br#"{"cniVersion":"1.0.0","name":"a","network":7}"#).map_err(|e| e.code), Err(code::INVALID_CONFIG));
        let gc = parse_conf(br#"{"cniVersion":"1.1.0","name":"a","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#).expect("gc");
        assert_eq!(gc.valid, Some(vec![("c1".to_string(), "eth0".to_string())]));
        assert_eq!(parse_conf(br#"{"cniVersion":"1.1.0","name":"a","cni.dev/valid-attachments":[{"containerID":"c1"}]}"#).map_err(|e| e.code), Err(code::DECODE));
        assert_eq!(parse_conf(br#"{"cniVersion":"1.1.0","name":"a","cni.dev/valid-attachments":{}}"#).map_err(|e| e.code), Err(code::DECODE));
    }

    #[test]
    fn the_name_is_the_runtimes_else_the_container_id() {
        let conf = parse_conf(br#"{"cniVersion":"1.0.0","name":"a","runtimeConfig":{"name":"from-rc"}}"#).expect("conf");
        let mut env = Env::from_vars(|k| match k {
            "CNI_ARGS" => Some("IgnoreUnknown=1;K8S_POD_NAME=pod-a;K8S_POD_NAMESPACE=ns".into()),
            "CNI_CONTAINERID" => Some("c".repeat(64)),
            _ => None,
        });
        assert_eq!(container_name(&env, &conf), "pod-a");
        env.args.insert("K8S_POD_NAME".into(), format!("-web/{}", "x".repeat(80)));
        assert_eq!(container_name(&env, &conf), format!("web-{}", "x".repeat(58)), "made a DNS label");
        env.args.clear();
        assert_eq!(container_name(&env, &conf), "from-rc");
        let bare = parse_conf(br#"{"cniVersion":"1.0.0","name":"a"}"#).expect("conf");
        assert_eq!(container_name(&env, &bare), "c".repeat(12), "a 64-character id is no DNS label: its short id");
        env.container_id = "ctr1".into();
        assert_eq!(container_name(&env, &bare), "ctr1");
    }

    #[test]
    fn the_result_follows_the_previous_plugins_and_the_version() {
        let r = result("1.0.0", &attached(), "/run/netns/c1", None);
        assert_eq!(r["cniVersion"], "1.0.0");
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(r["interfaces"][1]["sandbox"], "/run/netns/c1");
        assert!(r["interfaces"][1].get("mtu").is_none(), "mtu is 1.1.0's");
        assert_eq!(r["ips"][0]["address"], "10.0.1.5/24");
        assert_eq!(r["ips"][0]["interface"], 1);
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["routes"][1]["gw"], "169.254.1.1");
        assert_eq!(r["dns"]["nameservers"][0], "127.0.0.11");
        assert_eq!(r["dns"]["search"][0], "lab");
        let prev = json!({"interfaces":[{"name":"x"}],"ips":[{"address":"192.168.0.2/24","interface":0}],"dns":{"nameservers":["1.1.1.1"]}});
        let r = result("0.4.0", &attached(), "/run/netns/c1", Some(&prev));
        assert_eq!(r["ips"][1]["interface"], 2, "after the earlier plugin's interface");
        assert_eq!(r["ips"][1]["version"], "4");
        assert_eq!(r["dns"]["nameservers"], json!(["1.1.1.1", "127.0.0.11"]));
        assert_eq!(result("1.1.0", &attached(), "/n", None)["interfaces"][1]["mtu"], 1450);
    }

    #[test]
    fn refusals_map_to_the_specs_codes() {
        assert_eq!(code_for(ErrorKind::Unavailable, "ADD"), code::TRY_AGAIN_LATER);
        assert_eq!(code_for(ErrorKind::NotFound, "ADD"), code::INVALID_CONFIG);
        assert_eq!(code_for(ErrorKind::Invalid, "ADD"), code::INVALID_CONFIG);
        assert_eq!(code_for(ErrorKind::NotFound, "CHECK"), code::UNKNOWN_CONTAINER);
        assert_eq!(code_for(ErrorKind::Conflict, "CHECK"), code::DRIFT);
        assert_eq!(CniError::new(11, "x").json("1.0.0"), json!({"cniVersion":"1.0.0","code":11,"msg":"x"}));
    }

    #[test]
    fn commands_without_their_environment_are_refused_before_the_daemon_is_asked() {
        let conf = br#"{"cniVersion":"1.0.0","name":"a","socket":"/nonexistent/control.sock"}"#;
        let env = |cmd: &str, netns: Option<&str>| Env { command: cmd.into(), container_id: "c1".into(), netns: netns.map(str::to_string), ifname: "eth0".into(), args: BTreeMap::new() };
        assert_eq!(run(&env("ADD", None), conf, "1.0.0").map_err(|e| e.code), Err(code::INVALID_ENV));
        assert_eq!(run(&env("ADD", Some("/nonexistent/netns")), conf, "1.0.0").map_err(|e| e.code), Err(code::INVALID_ENV));
        assert_eq!(run(&env("BOGUS", None), conf, "1.0.0").map_err(|e| e.code), Err(code::INVALID_ENV));
        assert_eq!(run(&env("DEL", None), conf, "1.0.0").map_err(|e| e.code), Err(code::TRY_AGAIN_LATER), "the daemon is not there");
        assert_eq!(run(&env("STATUS", None), conf, "1.0.0").map_err(|e| e.code), Err(code::NOT_AVAILABLE));
        let v = run(&env("VERSION", None), conf, "1.0.0").expect("version").expect("a result");
        assert!(v["supportedVersions"].as_array().is_some_and(|a| a.contains(&json!("1.0.0"))));
    }
}
