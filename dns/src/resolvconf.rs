//! The node's resolver settings, and the `/etc/resolv.conf` and `/etc/hosts` each task gets.
//! Pure text in, text out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The address of the embedded resolver inside every task.
pub const RESOLVER_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeResolv {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// Reads a resolv.conf: `nameserver`, `search` (the last of `search`/`domain` wins, as in
/// glibc) and `options`. Unknown lines and comments are skipped.
pub fn parse(text: &str) -> NodeResolv {
    let mut r = NodeResolv::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.split('%').next()).and_then(|w| w.parse::<IpAddr>().ok()) {
                    r.nameservers.push(SocketAddr::new(ip, 53));
                }
            }
            Some("search") | Some("domain") => r.search = words.map(str::to_string).collect(),
            Some("options") => r.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    r
}

/// Parses an upstream given on the command line: `IP` or `IP:PORT` (`[v6]:PORT`).
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>().map_err(|_| format!("--dns {s:?}: expected an IP address or IP:PORT"))
}

/// The task's resolv.conf: our resolver, then the node's search domains and options.
pub fn task_resolv_conf(node: &NodeResolv) -> String {
    let mut out = format!("# written by swarmnet for this task; the node's file is untouched\nnameserver {RESOLVER_ADDR}\n");
    if !node.search.is_empty() {
        out.push_str(&format!("search {}\n", node.search.join(" ")));
    }
    if !node.options.is_empty() {
        out.push_str(&format!("options {}\n", node.options.join(" ")));
    }
    out
}

/// The task's hosts file: loopback names and the task's own name on each of its addresses.
pub fn task_hosts(name: &str, short_id: &str, addrs: &[Ipv4Addr]) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for a in addrs {
        out.push_str(&format!("{a}\t{name} {short_id}\n"));
    }
    if addrs.is_empty() {
        // Its hostname resolves without DNS even with no address on a network (Debian's
        // convention for a host without a fixed address).
        out.push_str(&format!("127.0.1.1\t{name} {short_id}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_node_file() {
        let r = parse("# comment\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\ndomain a.example\nsearch b.example c.example ; x\noptions ndots:2\noptions timeout:1 edns0\n");
        assert_eq!(r.nameservers, vec!["10.0.0.2:53".parse().expect("addr"), "[fe80::1]:53".parse().expect("addr")]);
        assert_eq!(r.search, vec!["b.example", "c.example"]);
        assert_eq!(r.options, vec!["ndots:2", "timeout:1", "edns0"]);
    }

    #[test]
    fn renders_task_files() {
        let r = NodeResolv { nameservers: vec![], search: vec!["corp.example".into()], options: vec!["ndots:1".into()] };
        let text = task_resolv_conf(&r);
        assert!(text.contains("\nnameserver 127.0.0.11\nsearch corp.example\noptions ndots:1\n"), "{text}");
        assert_eq!(parse(&text).nameservers, vec!["127.0.0.11:53".parse().expect("addr")]);
        let empty = task_resolv_conf(&NodeResolv::default());
        assert!(!empty.contains("search") && !empty.contains("options"));
        let hosts = task_hosts("web.1", "abc123", &[Ipv4Addr::new(10, 0, 0, 3)]);
        assert!(hosts.ends_with("10.0.0.3\tweb.1 abc123\n"));
        assert!(task_hosts("job", "abc123", &[]).ends_with("127.0.1.1\tjob abc123\n"));
    }

    #[test]
    fn upstreams_from_flags() {
        assert_eq!(parse_upstream("10.0.0.1"), Ok("10.0.0.1:53".parse().expect("addr")));
        assert_eq!(parse_upstream("10.0.0.1:5353"), Ok("10.0.0.1:5353".parse().expect("addr")));
        assert_eq!(parse_upstream("[::1]:53"), Ok("[::1]:53".parse().expect("addr")));
        assert!(parse_upstream("nope").is_err());
    }
}
