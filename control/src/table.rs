//! The CLI's tables: each reply type says its columns; an empty cell prints as `-`, so no
//! column is ever silently blank.

use swarmnet_api::replies::{format_port, GossipView, LbTable, NetworkInfo, NodeInfo, ServiceInfo, TaskInfo};

pub trait Row {
    const HEADERS: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

fn lower<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

impl Row for NodeInfo {
    const HEADERS: &'static [&'static str] = &["ID", "HOSTNAME", "ADDRESS", "STATUS", "AVAILABILITY", "MANAGER STATUS", "GOSSIP", "GOSSIP KEY"];
    fn cells(&self) -> Vec<String> {
        let gossip = match self.gossip {
            Some(GossipView::Alive) => "alive",
            Some(GossipView::Unreachable) => "unreachable",
            Some(GossipView::Unknown) | None => "unknown",
        };
        let key = match &self.gossip_key {
            Some(k) if k.holds_current() => format!("current ({})", k.current),
            Some(k) => format!("stale (holds {:?}, current {})", k.held, k.current),
            None => String::new(),
        };
        vec![
            self.id.clone(),
            self.hostname.clone(),
            self.address.to_string(),
            lower(&self.status),
            lower(&self.availability),
            self.manager_status.as_ref().map(lower).unwrap_or_default(),
            gossip.into(),
            key,
        ]
    }
}

impl Row for NetworkInfo {
    const HEADERS: &'static [&'static str] = &["NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNET", "VNI", "ATTACHABLE"];
    fn cells(&self) -> Vec<String> {
        vec![self.id.clone(), self.name.clone(), self.driver.to_string(), lower(&self.scope), self.subnet.to_string(), self.vni.to_string(), self.attachable.to_string()]
    }
}

impl Row for ServiceInfo {
    const HEADERS: &'static [&'static str] = &["ID", "NAME", "MODE", "REPLICAS", "ENDPOINT", "PORTS"];
    fn cells(&self) -> Vec<String> {
        let ports: Vec<String> = self.ports.iter().map(format_port).collect();
        vec![self.id.clone(), self.name.clone(), lower(&self.mode), self.replicas.clone(), lower(&self.endpoint_mode), ports.join(",")]
    }
}

impl Row for TaskInfo {
    const HEADERS: &'static [&'static str] = &["ID", "NAME", "NODE", "DESIRED STATE", "CURRENT STATE", "ADDRESSES", "ERROR"];
    fn cells(&self) -> Vec<String> {
        let addrs: Vec<String> = self.addresses.iter().map(|(n, a)| format!("{n}={a}")).collect();
        vec![self.id.clone(), self.name.clone(), self.node.clone(), lower(&self.desired_state), lower(&self.state), addrs.join(","), self.error.clone()]
    }
}

/// One line per backend of each VIP (a VIP without backends gets a line of its own).
pub struct LbRow {
    service: String,
    vip: String,
    task: String,
    ip: String,
    state: String,
    connections: String,
}

pub fn lb_rows(t: &LbTable) -> Vec<LbRow> {
    let mut out = Vec::new();
    for s in &t.services {
        if let Some(e) = &s.error {
            out.push(LbRow { service: s.service.clone(), vip: s.vip.to_string(), task: String::new(), ip: String::new(), state: format!("error: {e}"), connections: String::new() });
        }
        if s.backends.is_empty() {
            out.push(LbRow { service: s.service.clone(), vip: s.vip.to_string(), task: String::new(), ip: String::new(), state: "no task: refuses".into(), connections: String::new() });
        }
        for b in &s.backends {
            out.push(LbRow { service: s.service.clone(), vip: s.vip.to_string(), task: b.task.clone(), ip: b.ip.to_string(), state: lower(&b.state), connections: b.connections.to_string() });
        }
    }
    out
}

/// One line per backend of each published port (a port without backends gets one too).
pub struct PortRow {
    port: String,
    mode: String,
    service: String,
    task: String,
    backend: String,
    state: String,
    connections: String,
}

pub fn port_rows(t: &LbTable) -> Vec<PortRow> {
    let mut out = Vec::new();
    for p in &t.ports {
        let port = format!("{}/{}", p.published, p.protocol);
        if p.backends.is_empty() {
            out.push(PortRow {
                port: port.clone(),
                mode: p.mode.to_string(),
                service: p.service.clone(),
                task: String::new(),
                backend: String::new(),
                state: "no task: refuses".into(),
                connections: String::new(),
            });
        }
        for b in &p.backends {
            out.push(PortRow {
                port: port.clone(),
                mode: p.mode.to_string(),
                service: p.service.clone(),
                task: b.task.clone(),
                backend: format!("{}:{}", b.ip, b.target),
                state: lower(&b.state),
                connections: b.connections.to_string(),
            });
        }
    }
    out
}

impl Row for PortRow {
    const HEADERS: &'static [&'static str] = &["PUBLISHED", "MODE", "SERVICE", "TASK", "BACKEND", "STATE", "CONNECTIONS"];
    fn cells(&self) -> Vec<String> {
        vec![self.port.clone(), self.mode.clone(), self.service.clone(), self.task.clone(), self.backend.clone(), self.state.clone(), self.connections.clone()]
    }
}

impl Row for LbRow {
    const HEADERS: &'static [&'static str] = &["SERVICE", "VIP", "TASK", "BACKEND", "STATE", "CONNECTIONS"];
    fn cells(&self) -> Vec<String> {
        vec![self.service.clone(), self.vip.clone(), self.task.clone(), self.ip.clone(), self.state.clone(), self.connections.clone()]
    }
}

/// The rows under their headers, columns aligned.
pub fn render<T: Row>(rows: &[T]) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(|r| r.cells().into_iter().map(|c| if c.is_empty() { "-".to_string() } else { c }).collect()).collect();
    let mut widths: Vec<usize> = T::HEADERS.iter().map(|h| h.len()).collect();
    for r in &cells {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.len());
            }
        }
    }
    let line = |cells: &[String]| -> String {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0))).collect();
        format!("{}\n", s.join("   ").trim_end())
    };
    let mut out = line(&T::HEADERS.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for r in &cells {
        out.push_str(&line(r));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use swarmnet_api::{DesiredState, TaskState};

    #[test]
    fn empty_cells_show_a_dash_and_columns_align() {
        let t = TaskInfo {
            id: "t1".into(),
            name: "web.1".into(),
            node: String::new(),
            node_id: None,
            desired_state: DesiredState::Running,
            state: TaskState::Pending,
            error: "network small (10.9.9.0/29) has no free address left".into(),
            addresses: BTreeMap::new(),
            pid: None,
            restarts: 0,
            version: 0,
            orphaned: false,
            service_id: None,
            slot: None,
            since_ms: 0,
        };
        let out = render(&[t]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID   NAME    NODE   DESIRED STATE"), "{out}");
        assert!(lines[1].starts_with("t1   web.1   -      running         pending         -           network small"), "{out}");
    }
}
