//! swarmnet's service discovery: the record store fed by the endpoint table (pure), the
//! resolver each task talks to on 127.0.0.11:53 (a hickory-server handler, scoped to the
//! task's networks), forwarding of other names upstream, and the task's resolv.conf/hosts.

pub mod forward;
pub mod records;
pub mod resolvconf;
pub mod server;
pub mod udp;
