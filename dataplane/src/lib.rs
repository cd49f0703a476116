//! swarmnet's dataplane: kernel state on one node. Every netlink call lives in
//! [`netlink`]; every namespace switch happens on the thread of [`netns`].

pub mod netlink;
pub mod netns;
pub mod overlay;
pub mod task;
