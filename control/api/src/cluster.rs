//! The cluster's vocabulary as the API speaks it: roles, states, endpoint modes, what an
//! agent reports of a task, and the specs of the requests that create objects.

use serde::{Deserialize, Serialize};
use swarmnet_types::Id;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    Vip,
    Dnsrr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    Running,
    Shutdown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Not yet placed on a node or not yet given its addresses.
    Pending,
    /// Sent to its node, not yet reported running.
    Assigned,
    Running,
    /// The process exited with status 0 (standalone tasks).
    Complete,
    /// The process exited with an error or could not be started.
    Failed,
    /// Stopped on purpose.
    Shutdown,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Complete | TaskState::Failed | TaskState::Shutdown)
    }
}

/// What an agent says of one of its tasks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReport {
    pub task_id: Id,
    pub state: TaskState,
    pub error: String,
    pub pid: Option<u32>,
    pub restarts: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkCreate {
    pub name: String,
    pub driver: String,
    pub attachable: bool,
    pub subnet: Option<String>,
    /// The cluster's ingress network (there is one at most; the manager makes it).
    #[serde(default)]
    pub ingress: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceCreate {
    pub name: String,
    /// "replicated" or "global".
    pub mode: String,
    pub replicas: i64,
    pub networks: Vec<String>,
    pub endpoint_mode: EndpointMode,
    /// `published:target[/tcp|/udp]`
    pub publish: Vec<String>,
    pub command: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StandaloneCreate {
    pub name: String,
    pub networks: Vec<String>,
    pub command: Vec<String>,
}
