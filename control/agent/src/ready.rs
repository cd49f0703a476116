//! When a started task is ready to take connections: it listens on every port its service
//! publishes (the target port, by protocol), or, for a service that publishes none, on any
//! port at all. Read from the task's own network namespace (`/proc/<pid>/net/{tcp,udp}{,6}`
//! show the sockets of the namespace the process is in), leaving out the node's resolver,
//! which listens on 127.0.0.11 in every task's namespace.
//!
//! Until then its endpoints stay draining: the overlay knows them, but no load balancer and
//! no DNS answer sends anything to them (ADR 0023). A task that never listens is taken as
//! ready after a bound ([`bound`]), as Swarm takes every task without a health check.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use swarmnet_dns::resolvconf::RESOLVER_ADDR;
use swarmnet_types::{Port, Protocol};

/// How long a task may take to listen on its published ports before it is taken as ready
/// anyway (a server that listens elsewhere, or never).
pub const BOUND_PUBLISHED: Duration = Duration::from_secs(10);
/// The same for a task whose service publishes nothing: it may be a client, or a worker
/// that serves nothing, and cannot be told apart from a server that starts slowly.
pub const BOUND_UNPUBLISHED: Duration = Duration::from_secs(2);

/// How long a task with these published ports may take to become ready.
pub fn bound(ports: &[Port]) -> Duration {
    if ports.is_empty() {
        BOUND_UNPUBLISHED
    } else {
        BOUND_PUBLISHED
    }
}

/// The ports a namespace listens on: TCP sockets in LISTEN, UDP sockets bound and not
/// connected.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Listening {
    pub tcp: BTreeSet<u16>,
    pub udp: BTreeSet<u16>,
}

impl Listening {
    /// Reads the namespace of process `pid`. A file that cannot be read (the process is
    /// gone, or the kernel has no IPv6) counts as no socket.
    pub fn of_process(pid: u32) -> Listening {
        let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default();
        let mut l = Listening::default();
        for f in ["tcp", "tcp6"] {
            l.tcp.extend(listening_ports(&read(f), Protocol::Tcp));
        }
        for f in ["udp", "udp6"] {
            l.udp.extend(listening_ports(&read(f), Protocol::Udp));
        }
        l
    }

    /// Whether a task whose service publishes `ports` is ready with these sockets.
    pub fn ready_for(&self, ports: &[Port]) -> bool {
        if ports.is_empty() {
            return !self.tcp.is_empty() || !self.udp.is_empty();
        }
        ports.iter().all(|p| match p.protocol {
            Protocol::Tcp => self.tcp.contains(&p.target),
            Protocol::Udp => self.udp.contains(&p.target),
        })
    }
}

/// TCP state LISTEN; for UDP, 07 (CLOSE) is an unconnected socket, which is what a server
/// has.
const TCP_LISTEN: &str = "0A";
const UDP_UNCONNECTED: &str = "07";

/// The local ports of the listening sockets in one `/proc/net/{tcp,udp}{,6}` text, the
/// resolver's left out. Lines that do not parse are skipped (the header among them).
pub fn listening_ports(text: &str, proto: Protocol) -> Vec<u16> {
    let want = match proto {
        Protocol::Tcp => TCP_LISTEN,
        Protocol::Udp => UDP_UNCONNECTED,
    };
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_slot, local, _remote, state) = (f.next()?, f.next()?, f.next()?, f.next()?);
            if state != want {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let ip = parse_addr(addr)?;
            let port = u16::from_str_radix(port, 16).ok()?;
            (ip != IpAddr::V4(RESOLVER_ADDR) && ip != IpAddr::V6(RESOLVER_ADDR.to_ipv6_mapped())).then_some(port)
        })
        .collect()
}

/// An address as the kernel prints it there: the bytes in memory order, each 32-bit word
/// printed as a number of the machine's byte order.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| hex.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()).map(u32::to_ne_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarmnet_types::PublishMode;

    fn hex4(ip: Ipv4Addr) -> String {
        format!("{:08X}", u32::from_ne_bytes(ip.octets()))
    }

    fn hex6(ip: Ipv6Addr) -> String {
        ip.octets().chunks(4).map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))).collect()
    }

    fn tcp_text(rows: &[(String, u16, &str)]) -> String {
        let mut s = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n".to_string();
        for (i, (a, p, st)) in rows.iter().enumerate() {
            s += &format!("   {i}: {a}:{p:04X} 00000000:0000 {st} 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0\n");
        }
        s
    }

    fn port(target: u16, protocol: Protocol) -> Port {
        Port { published: 8080, target, protocol, mode: PublishMode::Ingress }
    }

    #[test]
    fn listeners_are_found_and_the_resolver_is_left_out() {
        let text = tcp_text(&[
            (hex4(RESOLVER_ADDR), 53, "0A"),
            (hex4(Ipv4Addr::UNSPECIFIED), 80, "0A"),
            (hex4(Ipv4Addr::new(10, 0, 1, 5)), 8443, "0A"),
            // An established connection is not a listener.
            (hex4(Ipv4Addr::new(10, 0, 1, 5)), 40000, "01"),
        ]);
        assert_eq!(listening_ports(&text, Protocol::Tcp), vec![80, 8443]);
        let v6 = tcp_text(&[(hex6(Ipv6Addr::UNSPECIFIED), 9000, "0A"), (hex6(RESOLVER_ADDR.to_ipv6_mapped()), 53, "0A"), (hex6("fd00::5".parse().expect("v6")), 81, "0A")]);
        assert_eq!(listening_ports(&v6, Protocol::Tcp), vec![9000, 81]);
        let udp = tcp_text(&[(hex4(RESOLVER_ADDR), 53, "07"), (hex4(Ipv4Addr::UNSPECIFIED), 5353, "07"), (hex4(Ipv4Addr::UNSPECIFIED), 41000, "01")]);
        assert_eq!(listening_ports(&udp, Protocol::Udp), vec![5353]);
    }

    #[test]
    fn the_addresses_read_as_the_kernel_writes_them() {
        assert_eq!(parse_addr(&hex4(Ipv4Addr::new(127, 0, 0, 11))), Some(IpAddr::V4(RESOLVER_ADDR)));
        assert_eq!(parse_addr(&hex6("fd00::1:2".parse().expect("v6"))), Some("fd00::1:2".parse().expect("v6")));
        assert_eq!(parse_addr("0100007"), None);
        assert_eq!(parse_addr("zz00007F"), None);
    }

    #[test]
    fn garbage_is_skipped() {
        assert!(listening_ports("", Protocol::Tcp).is_empty());
        assert!(listening_ports("not a table\n 0: 0100007F 00000000:0000 0A\n 1: 0100007F:ZZZZ 0:0 0A\n", Protocol::Tcp).is_empty());
    }

    #[test]
    fn ready_means_every_published_target_or_any_port_when_none() {
        let l = Listening { tcp: [80].into(), udp: [53].into() };
        assert!(l.ready_for(&[port(80, Protocol::Tcp)]));
        assert!(l.ready_for(&[port(80, Protocol::Tcp), port(53, Protocol::Udp)]));
        assert!(!l.ready_for(&[port(80, Protocol::Tcp), port(81, Protocol::Tcp)]));
        // The protocol counts: a TCP listener on 53 does not serve UDP 53.
        assert!(!l.ready_for(&[port(80, Protocol::Udp)]));
        assert!(l.ready_for(&[]));
        assert!(!Listening::default().ready_for(&[]));
        assert_eq!(bound(&[]), BOUND_UNPUBLISHED);
        assert_eq!(bound(&[port(80, Protocol::Tcp)]), BOUND_PUBLISHED);
    }
}
