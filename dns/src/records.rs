//! The record store: a plain lookup structure with no I/O, fed by the endpoint table's
//! change stream (the same one the overlay consumes) and asked with the asker's networks.
//!
//! - `web` → the VIP of service `web` on the asker's networks (endpoint mode vip), or the
//!   addresses of its active tasks (dnsrr: no VIP);
//! - `tasks.web` → the addresses of the active tasks of `web`; NXDOMAIN (never forwarded) if
//!   there is no such service: `tasks.` names are the cluster's own;
//! - a task's name (`web.1`, a standalone task's `--name`) or an alias → its address;
//! - PTR of a task address → its name; of an address no server anywhere names (0/8,
//!   127/8, 169.254/16, 255.255.255.255, ::, ::1: RFC 6303's locally served zones, the
//!   private ranges left out since a site's own DNS may serve them) → NXDOMAIN here, not
//!   forwarded (`socket.getfqdn("0.0.0.0")`, which Python's http.server calls before it
//!   listens, waited 4 s for an upstream that cannot know);
//! - anything else is not ours: forward it upstream.
//!
//! A draining endpoint leaves every answer at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use swarmnet_types::{Change, Endpoint, EndpointState, Protocol};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Addresses, in a stable order; the server shuffles them per query.
    Addrs(Vec<Ipv4Addr>),
    /// A PTR answer.
    Name(String),
    /// SRV answers: (port, target name).
    Srv(Vec<(u16, String)>),
    /// The name is ours but has no record of the asked type (or no active task now).
    NoData,
    /// A cluster name that does not exist: answered here, never forwarded.
    NxDomain,
    /// Not a cluster name: forward to the upstream resolvers.
    NotLocal,
}

#[derive(Default)]
pub struct Records {
    /// network id → endpoint id → endpoint
    nets: BTreeMap<String, BTreeMap<String, Arc<Endpoint>>>,
}

fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Records {
    pub fn apply(&mut self, c: &Change) {
        match &c.new {
            Some(e) => {
                self.nets.entry(c.network.clone()).or_default().insert(c.id.clone(), e.clone());
            }
            None => {
                if let Some(n) = self.nets.get_mut(&c.network) {
                    n.remove(&c.id);
                    if n.is_empty() {
                        self.nets.remove(&c.network);
                    }
                }
            }
        }
    }

    fn in_scope<'a>(&'a self, scope: &'a [String]) -> impl Iterator<Item = &'a Endpoint> + 'a {
        scope.iter().filter_map(|n| self.nets.get(n)).flat_map(|m| m.values().map(|e| &**e))
    }

    fn active_ips<'a>(eps: impl Iterator<Item = &'a Endpoint>) -> Vec<Ipv4Addr> {
        let set: BTreeSet<Ipv4Addr> = eps.filter(|e| e.state == EndpointState::Active).map(|e| e.ip).collect();
        set.into_iter().collect()
    }

    fn addrs_or_nodata(v: Vec<Ipv4Addr>) -> Answer {
        if v.is_empty() {
            Answer::NoData
        } else {
            Answer::Addrs(v)
        }
    }

    /// Replaces everything known about `network` (after the change stream lagged).
    pub fn replace_network(&mut self, network: &str, eps: Vec<Arc<Endpoint>>) {
        if eps.is_empty() {
            self.nets.remove(network);
            return;
        }
        self.nets.insert(network.to_string(), eps.into_iter().map(|e| (e.id.clone(), e)).collect());
    }

    /// Endpoints of the service called `name` (or aliased `name`) in scope.
    fn service<'a>(&'a self, scope: &'a [String], name: &'a str) -> Vec<&'a Endpoint> {
        self.in_scope(scope).filter(|e| !e.service_name.is_empty() && (e.service_name.eq_ignore_ascii_case(name) || e.aliases.iter().any(|a| a.eq_ignore_ascii_case(name)))).collect()
    }

    /// A records for `qname` as seen from a task on the networks `scope` (network ids).
    pub fn a(&self, scope: &[String], qname: &str) -> Answer {
        let name = norm(qname);
        if let Some(svc) = name.strip_prefix("tasks.") {
            let eps = self.service(scope, svc);
            if eps.is_empty() {
                return Answer::NxDomain;
            }
            return Self::addrs_or_nodata(Self::active_ips(eps.into_iter()));
        }
        let svc = self.service(scope, &name);
        if !svc.is_empty() {
            let vips: BTreeSet<Ipv4Addr> = svc.iter().filter_map(|e| e.vip).collect();
            if !vips.is_empty() {
                return Answer::Addrs(vips.into_iter().collect());
            }
            return Self::addrs_or_nodata(Self::active_ips(svc.into_iter()));
        }
        // A task's own name, or an alias of a standalone task.
        let tasks: Vec<&Endpoint> =
            self.in_scope(scope).filter(|e| e.task_name.eq_ignore_ascii_case(&name) || (e.service_name.is_empty() && e.aliases.iter().any(|a| a.eq_ignore_ascii_case(&name)))).collect();
        if !tasks.is_empty() {
            return Self::addrs_or_nodata(Self::active_ips(tasks.into_iter()));
        }
        Answer::NotLocal
    }

    /// AAAA and every other type but A, PTR and SRV: cluster names have IPv4 addresses
    /// only, so a name of ours is NoData (empty NOERROR); otherwise as A would answer.
    pub fn other(&self, scope: &[String], qname: &str) -> Answer {
        Self::nodata_if_ours(self.a(scope, qname))
    }

    fn nodata_if_ours(a: Answer) -> Answer {
        match a {
            Answer::Addrs(_) | Answer::NoData => Answer::NoData,
            other => other,
        }
    }

    /// SRV for `_<label>._<tcp|udp>.<service>`: one record per port the service publishes
    /// with that protocol (its target port), pointing at the service name (VIP mode) or at
    /// each active task's name (dnsrr). The first label is not matched against anything:
    /// ports have no names in a service spec.
    pub fn srv(&self, scope: &[String], qname: &str) -> Answer {
        let name = norm(qname);
        let mut labels = name.splitn(3, '.');
        let (Some(l1), Some(l2), Some(svc)) = (labels.next(), labels.next(), labels.next()) else {
            return self.other(scope, qname);
        };
        let proto = match l2 {
            "_tcp" => Protocol::Tcp,
            "_udp" => Protocol::Udp,
            _ => return self.other(scope, qname),
        };
        if !l1.starts_with('_') {
            return self.other(scope, qname);
        }
        let eps = self.service(scope, svc);
        if eps.is_empty() {
            return Answer::NotLocal;
        }
        let ports: BTreeSet<u16> = eps.iter().flat_map(|e| e.ports.iter()).filter(|p| p.protocol == proto).map(|p| p.target).collect();
        let vip = eps.iter().any(|e| e.vip.is_some());
        let mut out = Vec::new();
        for port in ports {
            if vip {
                out.push((port, svc.to_string()));
            } else {
                let names: BTreeSet<&str> = eps.iter().filter(|e| e.state == EndpointState::Active).map(|e| e.task_name.as_str()).collect();
                out.extend(names.into_iter().map(|n| (port, n.to_string())));
            }
        }
        if out.is_empty() {
            Answer::NoData
        } else {
            Answer::Srv(out)
        }
    }

    /// PTR of an address on the asker's networks: a task's name, or a service's for its VIP.
    pub fn ptr(&self, scope: &[String], ip: Ipv4Addr) -> Answer {
        if let Some(e) = self.in_scope(scope).find(|e| e.ip == ip && e.state == EndpointState::Active) {
            return Answer::Name(e.task_name.clone());
        }
        match self.in_scope(scope).find(|e| e.vip == Some(ip) && !e.service_name.is_empty()) {
            Some(e) => Answer::Name(e.service_name.clone()),
            None => Answer::NotLocal,
        }
    }
}

/// Whether the reverse name of `ip` belongs to a zone every resolver answers itself
/// (RFC 6303, the private ranges left out).
pub fn locally_served(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 0 || v4.is_loopback() || v4.is_link_local() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_loopback(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarmnet_types::Port;

    #[test]
    fn reverse_zones_no_one_serves_are_answered_here() {
        for ip in ["0.0.0.0", "0.1.2.3", "127.0.0.1", "127.0.0.11", "169.254.1.1", "255.255.255.255", "::", "::1"] {
            assert!(locally_served(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["10.0.0.1", "172.16.0.1", "192.168.1.1", "8.8.8.8", "fd00::1", "2001:db8::1"] {
            assert!(!locally_served(ip.parse().expect("ip")), "{ip}");
        }
    }

    fn ep(net: &str, id: &str, svc: &str, task: &str, last: u8, vip: Option<u8>) -> Endpoint {
        Endpoint {
            network: net.into(),
            id: id.into(),
            task_name: task.into(),
            service_name: svc.into(),
            service_id: format!("{svc}-id"),
            aliases: vec![],
            ip: Ipv4Addr::new(10, 0, 0, last),
            mac: [2, 0x42, 10, 0, 0, last],
            vtep: "10.210.0.1".parse().expect("ip"),
            vip: vip.map(|v| Ipv4Addr::new(10, 0, 0, v)),
            ports: vec![],
            state: EndpointState::Active,
        }
    }

    fn add(r: &mut Records, e: Endpoint) {
        r.apply(&Change { network: e.network.clone(), id: e.id.clone(), old: None, new: Some(Arc::new(e)) });
    }

    fn del(r: &mut Records, net: &str, id: &str) {
        r.apply(&Change { network: net.into(), id: id.into(), old: None, new: None });
    }

    fn scope(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    #[test]
    fn service_vip_tasks_and_task_names() {
        let mut r = Records::default();
        add(&mut r, ep("n", "t1", "web", "web.1", 3, Some(2)));
        add(&mut r, ep("n", "t2", "web", "web.2", 4, Some(2)));
        let s = scope(&["n"]);
        assert_eq!(r.a(&s, "web"), Answer::Addrs(vec![ip(2)]));
        assert_eq!(r.a(&s, "WEB."), Answer::Addrs(vec![ip(2)]), "case and trailing dot");
        assert_eq!(r.a(&s, "tasks.web"), Answer::Addrs(vec![ip(3), ip(4)]));
        assert_eq!(r.a(&s, "web.2"), Answer::Addrs(vec![ip(4)]));
        assert_eq!(r.ptr(&s, ip(3)), Answer::Name("web.1".into()));
        assert_eq!(r.other(&s, "web"), Answer::NoData);
        assert_eq!(r.a(&s, "example.com"), Answer::NotLocal);
        assert_eq!(r.other(&s, "example.com"), Answer::NotLocal);
        assert_eq!(r.a(&s, "tasks.nope"), Answer::NxDomain, "tasks.* never leaks upstream");
        del(&mut r, "n", "t1");
        assert_eq!(r.a(&s, "tasks.web"), Answer::Addrs(vec![ip(4)]));
        assert_eq!(r.ptr(&s, ip(3)), Answer::NotLocal);
    }

    #[test]
    fn dnsrr_answers_task_addresses_and_draining_tasks_leave_answers() {
        let mut r = Records::default();
        add(&mut r, ep("n", "t1", "db", "db.1", 5, None));
        add(&mut r, ep("n", "t2", "db", "db.2", 6, None));
        let s = scope(&["n"]);
        assert_eq!(r.a(&s, "db"), Answer::Addrs(vec![ip(5), ip(6)]));
        let mut d = ep("n", "t2", "db", "db.2", 6, None);
        d.state = EndpointState::Draining;
        add(&mut r, d);
        assert_eq!(r.a(&s, "db"), Answer::Addrs(vec![ip(5)]));
        assert_eq!(r.a(&s, "tasks.db"), Answer::Addrs(vec![ip(5)]));
        del(&mut r, "n", "t1");
        assert_eq!(r.a(&s, "tasks.db"), Answer::NoData, "the service exists, no task is active");
    }

    #[test]
    fn scoping_and_standalone_names_and_aliases() {
        let mut r = Records::default();
        add(&mut r, ep("red", "t1", "web", "web.1", 3, Some(2)));
        let mut probe = ep("blue", "p", "", "probe", 9, None);
        probe.aliases = vec!["api".into()];
        add(&mut r, probe);
        assert_eq!(r.a(&scope(&["blue"]), "web"), Answer::NotLocal, "red's names are not visible from blue");
        assert_eq!(r.a(&scope(&["blue"]), "tasks.web"), Answer::NxDomain);
        assert_eq!(r.a(&scope(&["blue"]), "probe"), Answer::Addrs(vec![ip(9)]));
        assert_eq!(r.a(&scope(&["blue"]), "api"), Answer::Addrs(vec![ip(9)]));
        assert_eq!(r.a(&scope(&["red", "blue"]), "web"), Answer::Addrs(vec![ip(2)]), "a task on both sees both");
        assert_eq!(r.a(&scope(&["red"]), "probe"), Answer::NotLocal);
    }

    #[test]
    fn service_aliases_resolve_like_the_service_and_vips_have_ptr() {
        let mut r = Records::default();
        let mut e = ep("n", "t1", "web", "web.1", 3, Some(2));
        e.aliases = vec!["api".into()];
        add(&mut r, e);
        let s = scope(&["n"]);
        assert_eq!(r.a(&s, "api"), Answer::Addrs(vec![ip(2)]), "a service alias gives the VIP");
        assert_eq!(r.a(&s, "tasks.api"), Answer::Addrs(vec![ip(3)]));
        assert_eq!(r.ptr(&s, ip(2)), Answer::Name("web".into()));
        assert_eq!(r.other(&s, "api"), Answer::NoData);
    }

    #[test]
    fn srv_from_published_ports() {
        let mut r = Records::default();
        let mut e = ep("n", "t1", "web", "web.1", 3, Some(2));
        e.ports =
            vec![Port { published: 8080, target: 80, protocol: Protocol::Tcp, mode: Default::default() }, Port { published: 5353, target: 53, protocol: Protocol::Udp, mode: Default::default() }];
        add(&mut r, e);
        let mut d1 = ep("n", "d1", "db", "db.1", 5, None);
        d1.ports = vec![Port { published: 5432, target: 5432, protocol: Protocol::Tcp, mode: Default::default() }];
        let mut d2 = d1.clone();
        d2.id = "d2".into();
        d2.task_name = "db.2".into();
        d2.ip = ip(6);
        add(&mut r, d1);
        add(&mut r, d2);
        let s = scope(&["n"]);
        assert_eq!(r.srv(&s, "_http._tcp.web"), Answer::Srv(vec![(80, "web".into())]));
        assert_eq!(r.srv(&s, "_dns._udp.web."), Answer::Srv(vec![(53, "web".into())]));
        assert_eq!(r.srv(&s, "_pg._tcp.db"), Answer::Srv(vec![(5432, "db.1".into()), (5432, "db.2".into())]));
        assert_eq!(r.srv(&s, "_x._udp.db"), Answer::NoData);
        assert_eq!(r.srv(&s, "_http._tcp.example.com"), Answer::NotLocal);
        assert_eq!(r.srv(&s, "web"), Answer::NoData, "a name of ours without SRV shape");
    }

    #[test]
    fn replacing_a_network_after_a_lag() {
        let mut r = Records::default();
        add(&mut r, ep("n", "t1", "web", "web.1", 3, Some(2)));
        r.replace_network("n", vec![Arc::new(ep("n", "t2", "web", "web.2", 4, Some(2)))]);
        assert_eq!(r.a(&scope(&["n"]), "tasks.web"), Answer::Addrs(vec![ip(4)]));
        r.replace_network("n", vec![]);
        assert!(r.nets.is_empty(), "an empty network leaves nothing behind");
    }
}
