//! swarmnet's service discovery.
//!
//! Pure (no I/O, tested without root): [`records`], the record store, answering with the
//! asker's networks; [`sink`], the store's sink of the endpoint stream; [`resolvconf`], the
//! node's and the tasks' resolv.conf and hosts text.
//!
//! Behind the `server` feature, the I/O: [`server`], the resolver each task talks to on
//! 127.0.0.11:53 (a hickory-server handler, scoped to the task's networks); [`udp`], the
//! batched UDP loop; [`forward`], forwarding of other names upstream.

pub mod records;
pub mod resolvconf;
pub mod sink;

#[cfg(feature = "server")]
pub mod forward;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod udp;
