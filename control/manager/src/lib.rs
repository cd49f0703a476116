//! The manager: decides what should exist and never touches a packet (its crate cannot
//! depend on the dataplane, DNS or eBPF crates).
//!
//! - [`model`]: the stored objects and the cluster state as one value (ADR 0001);
//! - [`ipam`], [`ops`]: address management, every mutation and the scheduler, pure;
//! - [`store`]: the `Store` trait and its redb implementation;
//! - [`pki`]: the cluster CA and node certificates;
//! - [`server`]: the manager itself (its state, store and gossip keys), TCP 2377 (TLS, join,
//!   the routing of each connection) and the heartbeat watch;
//! - [`session`]: a node's session, the protocol pure and tested apart;
//! - [`api`]: the API's dispatch; [`views`]: how the state reads in replies (pure).

pub mod api;
pub mod ipam;
pub mod logs;
pub mod model;
pub mod ops;
pub mod pki;
pub mod server;
pub mod session;
pub mod store;
pub mod views;

pub use server::{Manager, ManagerConfig, ManagerError};
