//! The node on the ingress network, as the manager says (`FromManager::Ingress`): it holds
//! the network in membership, has its port into it (`sning0`, ADR 0011) and publishes its
//! own endpoint there (other nodes' tasks send replies back to it). The mesh's sink is told
//! last, so it programs the published ports once the node can carry them.

use std::sync::Arc;
use std::time::Duration;

use swarmnet_api::NodeIngress;
use swarmnet_dataplane::ingress::{self as dp, IngressHandle, Me};
use swarmnet_dataplane::netns::NsWorker;
use swarmnet_dataplane::overlay::Sandboxes;
use swarmnet_gossip::server::{Cmd, GossipHandle};
use swarmnet_types::{ingress_node_endpoint_id, mac_for, Endpoint, EndpointState};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::membership::Membership;

const HOLDER: &str = "node-ingress";

pub struct NodeIngressDeps {
    pub ns: NsWorker,
    pub sandboxes: Arc<Sandboxes>,
    pub membership: Arc<Membership>,
    pub gossip: GossipHandle,
    pub sink: IngressHandle,
    pub node_id: String,
    pub vtep: std::net::IpAddr,
    pub mtu: u32,
}

fn endpoint(d: &NodeIngressDeps, want: &NodeIngress) -> Endpoint {
    let id = ingress_node_endpoint_id(&d.node_id);
    Endpoint {
        network: want.network.id.clone(),
        id: id.clone(),
        task_name: id,
        service_name: String::new(),
        service_id: String::new(),
        aliases: vec![],
        ip: want.address,
        mac: mac_for(want.address),
        vtep: d.vtep,
        vip: None,
        ports: vec![],
        state: EndpointState::Active,
    }
}

async fn join(d: &NodeIngressDeps, want: &NodeIngress) -> anyhow::Result<()> {
    let net = &want.network;
    d.membership.hold(net, HOLDER);
    d.membership.settle(&net.id, true).await.map_err(|e| anyhow::anyhow!("join ingress network {} vni {}: {e}", net.name, net.vni))?;
    let me = Me { network: net.id.clone(), name: net.name.clone(), vni: net.vni, address: want.address, subnet: net.subnet, gateway: net.gateway, vxlan_port: d.sandboxes.port(), mtu: d.mtu };
    dp::plug_node_port(&d.ns, &d.sandboxes, &me, d.mtu).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if d.gossip.send(Cmd::Set(Box::new(endpoint(d, want)))).is_err() {
        anyhow::bail!("gossip is not running: the node's ingress endpoint is not published");
    }
    d.sink.set_me(Some(me)).await.map_err(|e| anyhow::anyhow!("routing mesh: {e}"))?;
    info!(network = %net.name, vni = net.vni, address = %want.address, "node on the ingress network: published ports answer here");
    Ok(())
}

async fn leave(d: &NodeIngressDeps, had: &NodeIngress) {
    let net = &had.network;
    if let Err(e) = d.sink.set_me(None).await {
        warn!(network = %net.name, error = %e, "routing mesh: could not remove the published ports");
    }
    if d.gossip.send(Cmd::Remove { network: net.id.clone(), id: ingress_node_endpoint_id(&d.node_id) }).is_err() {
        error!("gossip is not running: the node's ingress endpoint is not withdrawn");
    }
    if let Err(e) = dp::unplug_node_port(&d.ns).await {
        warn!(network = %net.name, error = %e, "could not remove the node's ingress port");
    }
    d.membership.release(&net.id, HOLDER);
    if let Err(e) = d.membership.settle(&net.id, false).await {
        warn!(network = %net.name, error = %e, "could not settle the node's presence on the ingress network");
    }
    info!(network = %net.name, "node left the ingress network");
}

/// Follows the manager's word on the ingress network for as long as the agent runs; a
/// failure is retried every second (and says why in the log).
pub async fn run(d: NodeIngressDeps, mut rx: watch::Receiver<Option<NodeIngress>>) {
    let mut have: Option<NodeIngress> = None;
    loop {
        let want = rx.borrow_and_update().clone();
        let mut retry = false;
        if want != have {
            if let Some(old) = have.take() {
                leave(&d, &old).await;
            }
            if let Some(w) = want {
                match join(&d, &w).await {
                    Ok(()) => have = Some(w),
                    Err(e) => {
                        error!(error = %format!("{e:#}"), "the node cannot take its place on the ingress network: published ports do not answer here; retrying");
                        retry = true;
                    }
                }
            }
        }
        if retry {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                r = rx.changed() => if r.is_err() { return },
            }
        } else if rx.changed().await.is_err() {
            return;
        }
    }
}
