//! swarmnet's API, shared by the manager, the agent and the CLI, and nothing else: the
//! frames on TCP 2377 and on the local control socket (ADR 0002), the messages in them, the
//! specs of requests, typed replies, the cluster vocabulary they use (roles, task states,
//! endpoint modes), the rustls configurations of both ends, and join tokens.

pub mod cluster;
pub mod cni;
pub mod error;
pub mod logs;
pub mod messages;
pub mod replies;
pub mod tls;
pub mod token;
pub mod wire;

pub use cluster::*;
pub use error::{ApiError, ErrorKind};
pub use messages::*;
pub use wire::{read_msg, read_msg_within, write_msg, FrameError, MAX_FIRST_FRAME, MAX_FRAME};
