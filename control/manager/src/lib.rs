//! The manager: decides what should exist and never touches a packet (its crate cannot
//! depend on the dataplane, DNS or eBPF crates).
//!
//! - [`model`]: the stored objects and the cluster state as one value (ADR 0001);
//! - [`ipam`], [`ops`]: address management, every mutation and the scheduler, pure;
//! - [`store`]: the `Store` trait and its redb implementation;
//! - [`pki`]: the cluster CA and node certificates;
//! - [`server`]: TCP 2377 (join, node sessions, the API) and the heartbeat watch.

pub mod ipam;
pub mod model;
pub mod ops;
pub mod pki;
pub mod server;
pub mod store;

pub use server::{Manager, ManagerConfig, ManagerError};
