//! DNS's sink of the endpoint stream: keeps the node's record store (shared by every task's
//! resolver) equal to the endpoint table of the networks the node is on.

use std::sync::{Arc, RwLock};

use swarmnet_types::{Change, Endpoint, NetworkId, Resync, Sink, SinkError};

use crate::records::Records;

/// The node's record store, read by every resolver, written by the sink.
pub type RecordStore = Arc<RwLock<Records>>;

/// Runs `f` on the records (a poisoned lock still holds a consistent store: every write is
/// one map operation).
pub fn read<R>(store: &RecordStore, f: impl FnOnce(&Records) -> R) -> R {
    let g = store.read().unwrap_or_else(|p| p.into_inner());
    f(&g)
}

pub fn write<R>(store: &RecordStore, f: impl FnOnce(&mut Records) -> R) -> R {
    let mut g = store.write().unwrap_or_else(|p| p.into_inner());
    f(&mut g)
}

pub struct DnsSink {
    store: RecordStore,
}

impl DnsSink {
    pub fn new(store: RecordStore) -> DnsSink {
        DnsSink { store }
    }
}

#[async_trait::async_trait]
impl Sink for DnsSink {
    fn name(&self) -> &'static str {
        "dns"
    }

    async fn apply(&mut self, changes: &[Change]) -> Result<(), SinkError> {
        write(&self.store, |r| changes.iter().for_each(|c| r.apply(c)));
        Ok(())
    }

    async fn resync(&mut self, network: &NetworkId, endpoints: &[Arc<Endpoint>], how: Resync) -> Result<(), SinkError> {
        write(&self.store, |r| match how {
            Resync::Complete => r.replace_network(network, endpoints.to_vec()),
            Resync::Partial => {
                for e in endpoints {
                    r.apply(&Change { network: network.clone(), id: e.id.clone(), old: None, new: Some(e.clone()) });
                }
            }
        });
        Ok(())
    }

    async fn forget(&mut self, network: &NetworkId) -> Result<(), SinkError> {
        write(&self.store, |r| r.replace_network(network, Vec::new()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Answer;
    use std::net::{IpAddr, Ipv4Addr};
    use swarmnet_types::EndpointState;

    fn ep(id: &str, last: u8) -> Endpoint {
        Endpoint {
            network: "n".into(),
            id: id.into(),
            task_name: format!("web.{last}"),
            service_name: "web".into(),
            service_id: "s".into(),
            aliases: vec![],
            ip: Ipv4Addr::new(10, 0, 0, last),
            mac: [2, 0x42, 10, 0, 0, last],
            vtep: IpAddr::V4(Ipv4Addr::new(10, 210, 0, 2)),
            vip: None,
            ports: vec![],
            state: EndpointState::Active,
        }
    }

    fn tasks(store: &RecordStore) -> Answer {
        read(store, |r| r.a(&["n".to_string()], "tasks.web"))
    }

    fn addrs(v: &[u8]) -> Answer {
        Answer::Addrs(v.iter().map(|l| Ipv4Addr::new(10, 0, 0, *l)).collect())
    }

    #[tokio::test]
    async fn changes_resyncs_and_forget_reach_the_records() {
        let store = RecordStore::default();
        let mut s = DnsSink::new(store.clone());
        let (a, b, c) = (Arc::new(ep("a", 3)), Arc::new(ep("b", 4)), Arc::new(ep("c", 5)));
        s.apply(&[Change { network: "n".into(), id: "a".into(), old: None, new: Some(a.clone()) }]).await.expect("apply");
        assert_eq!(tasks(&store), addrs(&[3]));
        s.resync(&"n".into(), std::slice::from_ref(&b), Resync::Partial).await.expect("partial");
        assert_eq!(tasks(&store), addrs(&[3, 4]), "partial: added, nothing removed");
        s.resync(&"n".into(), &[b, c], Resync::Complete).await.expect("complete");
        assert_eq!(tasks(&store), addrs(&[4, 5]), "complete: the table as it stands");
        s.forget(&"n".into()).await.expect("forget");
        assert_eq!(tasks(&store), Answer::NxDomain, "a network the node left has no names");
    }
}
