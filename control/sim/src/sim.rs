//! Simulated nodes for benchmarks: each joins with a real token over real mutual TLS and
//! keeps a real session (heartbeats, assignments, reports), but "runs" its tasks by
//! reporting them running at once. They load the manager as many real nodes would.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use swarmnet_agent::session::{self as agent, Identity};
use swarmnet_api::tls;
use swarmnet_api::token::JoinToken;
use swarmnet_api::*;
use tokio::net::TcpStream;

pub async fn run(manager: String, token: String, count: usize, data_dir: &Path, addr: IpAddr) -> anyhow::Result<()> {
    let token = JoinToken::parse(&token)?;
    let mut handles = Vec::new();
    for i in 0..count {
        let dir = data_dir.join(format!("sim{i}"));
        std::fs::create_dir_all(&dir)?;
        let id = match Identity::load(&dir)? {
            Some(id) => id,
            None => agent::join(&dir, std::slice::from_ref(&manager), &token, &format!("sim{i}"), addr, vec![], None).await?,
        };
        handles.push(tokio::spawn(async move {
            loop {
                if let Err(e) = session(&id).await {
                    tracing::warn!(node = %id.node_id, error = %format!("{e:#}"), "simulated session failed");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    println!("{count} simulated nodes joined");
    for h in handles {
        h.await?;
    }
    Ok(())
}

async fn session(id: &Identity) -> anyhow::Result<()> {
    let cfg = tls::client_config(&id.ca_pem, &id.cert)?;
    let tcp = TcpStream::connect(&id.manager).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(tls::server_name(), tcp).await?;
    let (mut r, mut w) = tokio::io::split(tls);
    write_msg(&mut w, &Hello::Session { reports: vec![], hostname: None }).await?;
    let reply: Reply = read_msg(&mut r).await?.ok_or_else(|| anyhow!("closed"))?;
    let opened: SessionOpened = reply.into_data()?;
    let hb = Duration::from_millis(opened.heartbeat_ms.max(50));
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let reader = tokio::spawn(async move {
        while let Ok(Some(m)) = read_msg::<_, FromManager>(&mut r).await {
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut tick = tokio::time::interval(hb);
    let mut running: BTreeSet<String> = BTreeSet::new();
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = write_msg(&mut w, &FromAgent::Heartbeat).await { break Err(e.into()); }
            }
            m = rx.recv() => {
                let Some(FromManager::Assign { full, upsert, remove }) = m else { break Ok(()) };
                if full {
                    running.clear();
                }
                let mut reports = Vec::new();
                for a in upsert {
                    if running.insert(a.task_id.clone()) {
                        reports.push(TaskReport { task_id: a.task_id, state: TaskState::Running, error: String::new(), pid: None, restarts: 0 });
                    }
                }
                for id in remove {
                    running.remove(&id);
                    reports.push(TaskReport { task_id: id, state: TaskState::Shutdown, error: String::new(), pid: None, restarts: 0 });
                }
                if !reports.is_empty() {
                    if let Err(e) = write_msg(&mut w, &FromAgent::Reports { reports }).await { break Err(e.into()); }
                }
            }
        }
    };
    reader.abort();
    result
}

/// A gossip peer that publishes `count` endpoints on `network` (for the agent-memory
/// benchmark): the agents take them as remote endpoints and program their kernels.
pub async fn endpoints(addr: std::net::SocketAddr, seed: std::net::SocketAddr, network: String, count: usize, vips: bool, keys_from: &Path) -> anyhow::Result<()> {
    use swarmnet_gossip::server::{self, Cmd};
    use swarmnet_gossip::{Config, Ident};
    use swarmnet_types::{Endpoint, EndpointState};
    let h = server::start(Ident::new("sim-endpoints", addr, 1), Config::default()).await?;
    let keys = swarmnet_agent::gossip_keys::load(keys_from).map_err(|e| anyhow!(e))?;
    swarmnet_agent::gossip_keys::install(&h, &keys).map_err(|e| anyhow!(e))?;
    h.send(Cmd::Seeds(vec![seed]))?;
    while h.members().await?.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for k in 0..count {
        // 10.0.100.0 and up inside the network's subnet is left to the test to choose.
        let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 0, 100, 1)) + k as u32);
        // With `vips`: service sim-<k>, VIP 10.0.160.0 + k.
        let vip = vips.then(|| std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 0, 160, 0)) + k as u32));
        let o = ip.octets();
        h.send(Cmd::Set(Box::new(Endpoint {
            network: network.clone(),
            id: format!("sim-{k}"),
            task_name: format!("sim.{k}"),
            service_name: if vips { format!("sim-{k}") } else { "sim".into() },
            service_id: if vips { format!("sim-{k}") } else { "sim".into() },
            aliases: vec![],
            ip,
            mac: [2, 0x42, o[0], o[1], o[2], o[3]],
            vtep: addr.ip(),
            vip,
            ports: vec![],
            state: EndpointState::Active,
        })))?;
    }
    println!("{count} endpoints published");
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
