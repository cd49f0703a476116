//! What every part of swarmnet shares, and nothing that does I/O: ids, an overlay network as
//! the manager defines it, an endpoint as gossip carries it, a published port, a change of
//! the endpoint table, and the [`Sink`] trait through which the agent's one follow loop
//! feeds every consumer of that table (overlay, DNS, later the load balancer and ingress).

pub mod admission;
pub mod endpoint;
pub mod metrics;
pub mod network;
pub mod sink;

pub use endpoint::{format_mac, ingress_node_endpoint_id, is_ingress_node_endpoint, mac_for, Change, Endpoint, EndpointState, Port, Protocol, PublishMode};
pub use network::{Driver, Network};
pub use sink::{Resync, Sink, SinkError, SinkInput};

/// Ids are opaque strings made by the manager (25 base-36 characters).
pub type Id = String;
/// A node's id.
pub type NodeId = String;
/// A network's id.
pub type NetworkId = String;
/// A task's id; a task's endpoint on a network has the same id.
pub type TaskId = String;
