//! The agent: what runs on every node (the manager's too) and turns the manager's topology
//! into kernel state. It cannot depend on the manager's crate.
//!
//! - [`session`]: the node's identity, joining with a token, the session with the manager
//!   (heartbeats, assignments, task reports), `run`;
//! - [`runtime`], [`supervisor`]: tasks, each a small state machine (ADR 0004), taking
//!   connections once [`ready`];
//! - [`membership`]: which networks the node is on, and why;
//! - [`follow`]: the one loop that feeds the endpoint stream to every sink (ADR 0008);
//! - [`dns`]: the node's resolver set-up per task;
//! - [`ingress`]: the node's place on the ingress network (the routing mesh);
//! - [`tasklog`]: task output, stamped and rotated by a writer process per task;
//! - [`node`]: all of it wired together.

pub mod cni;
pub mod dns;
pub mod follow;
pub mod gossip_keys;
pub mod ingress;
pub mod membership;
pub mod node;
pub mod ready;
pub mod runtime;
pub mod session;
pub mod supervisor;
pub mod tasklog;

pub use session::{join, Agent, AgentConfig, Identity};
