//! UDP 53 in a task's namespace: a datagram through the resolver's UDP path
//! (`server::answer_datagram`: parse, plan, answer from the records or FORMERR), with a
//! record store holding services, tasks, a VIP and dnsrr names.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use swarmnet_dns::forward::Forwarder;
use swarmnet_dns::server::{answer_datagram, Config, Shared};
use swarmnet_types::{Change, Endpoint, EndpointState};

fn endpoint(i: u8, svc: &str, vip: Option<Ipv4Addr>) -> Endpoint {
    let ip = Ipv4Addr::new(10, 0, 1, i);
    Endpoint {
        network: "n".into(),
        id: format!("task{i}"),
        task_name: format!("{svc}.{i}"),
        service_name: svc.into(),
        service_id: format!("{svc}-id"),
        aliases: vec![format!("alias{i}")],
        ip,
        mac: [2, 0x42, 10, 0, 1, i],
        vtep: Ipv4Addr::new(10, 210, 0, 1).into(),
        vip,
        ports: vec![],
        state: if i % 5 == 0 { EndpointState::Draining } else { EndpointState::Active },
    }
}

struct Env {
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let shared = Shared::new(Config { ttl: 600, forwarder: Forwarder { upstreams: vec![], timeout: Duration::from_millis(100) } }).expect("dns thread");
        shared.write(|r| {
            for i in 1..=30u8 {
                let (svc, vip) = match i % 3 {
                    0 => ("web", Some(Ipv4Addr::new(10, 0, 1, 250))),
                    1 => ("db", None),
                    _ => ("cache", Some(Ipv4Addr::new(10, 0, 1, 251))),
                };
                let e = endpoint(i, svc, vip);
                r.apply(&Change { network: "n".into(), id: e.id.clone(), old: None, new: Some(std::sync::Arc::new(e)) });
            }
        });
        Env { rt: tokio::runtime::Builder::new_current_thread().build().expect("runtime"), shared }
    })
}

fuzz_target!(|data: &[u8]| {
    let e = env();
    let from = "10.0.1.77:40000".parse().expect("addr");
    let out = e.rt.block_on(answer_datagram(e.shared.clone(), vec!["n".into()], data, from));
    assert!(out.len() <= 1, "one datagram, at most one answer");
    for a in out {
        assert!(a.len() >= 12 && a.len() <= 4096, "answer of {} bytes", a.len());
        assert_eq!(a[..2], data[..2], "the answer carries the query's id");
        assert!(a[2] & 0x80 != 0, "an answer has QR set");
    }
});
