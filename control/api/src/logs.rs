//! `service logs` (issue 21). The CLI asks its daemon ([`crate::ApiRequest::ServiceLogs`]);
//! the manager that leads answers with the tasks whose output will come ([`LogsOpened`]),
//! then [`LogFrame`]s. It asks each node that runs one of them over that node's session
//! ([`crate::FromManager::Logs`]); the node opens a connection of its own to the manager for
//! the stream ([`crate::Hello::LogStream`]) and writes [`LogFrame::Lines`] on it, so a busy
//! log never delays a session's heartbeats or assignments. The CLI leaving ends the streams
//! all the way back to the nodes.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use swarmnet_types::Id;

/// Which of a task's outputs a line was written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One line of a task's output, stamped with the time its node's log writer read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub task_id: Id,
    /// Unix time in ns (0: a line stored before lines were stamped).
    pub ts_ns: u64,
    pub stream: LogStream,
    pub text: String,
}

/// What `service logs` asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    /// A service (name or id), or a task (id, unique id prefix, or name such as `web.1`).
    pub target: String,
    /// Keep streaming new lines until the client leaves.
    #[serde(default)]
    pub follow: bool,
    /// Only the last this many lines of each task.
    #[serde(default)]
    pub tail: Option<u64>,
    /// Only lines written at or after this unix time (ns).
    #[serde(default)]
    pub since_ns: Option<u64>,
}

/// A task whose output comes, as the CLI prefixes its lines (`web.1.<id>@node1`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSource {
    pub task_id: Id,
    pub name: String,
    pub node_id: Id,
    pub node: String,
}

/// The reply that opens a log stream; [`LogFrame`]s follow on the same connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsOpened {
    pub sources: Vec<LogSource>,
}

/// What follows [`LogsOpened`] (from the manager), and what a node writes on its stream
/// (`Lines` only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LogFrame {
    Lines {
        lines: Vec<LogLine>,
    },
    /// A node whose lines cannot come (down, gone, or it failed to read them), said once.
    Warning {
        message: String,
    },
    /// Every node has sent all it has (without `follow`).
    End,
}

/// Lines per frame at most.
pub const LINES_PER_FRAME: usize = 256;
/// Bytes of text per frame at most, counted as JSON could grow them (a control character
/// takes 6): far below the frame limit.
pub const BYTES_PER_FRAME: usize = 4 << 20;

/// `lines` cut into frames of at most [`LINES_PER_FRAME`] lines and [`BYTES_PER_FRAME`]
/// bytes (a line alone may be larger: it is cut at 16 KiB by the log writer).
pub fn frames(lines: Vec<LogLine>) -> Vec<Vec<LogLine>> {
    let mut out = Vec::new();
    let mut cur: Vec<LogLine> = Vec::new();
    let mut bytes = 0;
    for l in lines {
        let size = l.text.len() * 6 + l.task_id.len() + 64;
        if !cur.is_empty() && (cur.len() >= LINES_PER_FRAME || bytes + size > BYTES_PER_FRAME) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += size;
        cur.push(l);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A node sends at least this often on a stream it follows (an empty `Lines` frame when it
/// has none), and the manager passes it on: silence three times as long means the node or
/// the path is gone, and a client that left is noticed at the next frame.
pub const KEEPALIVE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_stay_under_both_limits() {
        let line = |n: usize| LogLine { task_id: "t".into(), ts_ns: 0, stream: LogStream::Stdout, text: "x".repeat(n) };
        let f = frames((0..600).map(|_| line(10)).collect());
        assert_eq!(f.iter().map(Vec::len).collect::<Vec<_>>(), [256, 256, 88]);
        let f = frames((0..100).map(|_| line(16 << 10)).collect());
        assert!(f.iter().all(|fr| fr.iter().map(|l| l.text.len() * 6).sum::<usize>() <= BYTES_PER_FRAME), "{}", f.len());
        assert_eq!(f.iter().map(Vec::len).sum::<usize>(), 100);
        assert!(frames(Vec::new()).is_empty());
    }
}
