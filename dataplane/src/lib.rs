//! swarmnet's dataplane: every piece of kernel state on one node. Every netlink call lives
//! in [`netlink`]; every namespace switch happens on the thread of [`netns`].
//!
//! - [`task`]: a task's namespace, veths and process;
//! - [`overlay`]: sandboxes (bridge + VXLAN per network), the pure plan of neighbour/FDB
//!   entries and its application, and the overlay's sink of the endpoint stream;
//! - [`lb`], [`ingress`]: homes of the load balancer and the routing mesh (later issues);
//! - [`state`]: atomic state files.

pub mod bpf_link;
pub mod cni;
pub mod ingress;
pub mod lb;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod overlay;
pub mod state;
pub mod task;
