//! Messages on TCP 2377 (inside mutual TLS) and on the local control socket, and their
//! framing: a 4-byte big-endian length, then that many bytes of JSON. See ADR 0002.

use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::model::{Id, Network};
use crate::ops::{NetworkCreate, ServiceCreate, StandaloneCreate, TaskReport};
use crate::pki::CertKey;

/// Largest frame either side accepts; a larger length prefix closes the connection.
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Decode(#[from] serde_json::Error),
}

pub async fn write_msg<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(body.len()))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one message; `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_msg<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(serde_json::from_slice(&body)?))
}

/// The first message of every connection to 2377.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Hello {
    /// From a node without a certificate: join with the token's secret.
    Join {
        secret: String,
        hostname: String,
        addr: IpAddr,
        underlay: Vec<IpNetwork>,
    },
    /// Opens the node's session: the full list of tasks it has now, then a stream.
    Session { reports: Vec<TaskReport> },
    /// One request, one reply.
    Api { request: ApiRequest },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Joined {
    pub node_id: Id,
    pub cluster_id: String,
    pub ca_pem: String,
    pub cert: CertKey,
}

/// Manager to agent, on a session.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromManager {
    /// `full`: this is every assignment of the node; otherwise changes.
    Assign {
        full: bool,
        upsert: Vec<Assignment>,
        remove: Vec<Id>,
    },
    /// The ready nodes (id, underlay address): where to find gossip peers.
    Nodes { nodes: Vec<(Id, IpAddr)> },
}

/// Agent to manager, on a session.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromAgent {
    Heartbeat,
    Reports { reports: Vec<TaskReport> },
}

/// What a node needs to run one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub task_id: Id,
    pub name: String,
    pub service_id: Option<Id>,
    #[serde(default)]
    pub service_name: Option<String>,
    /// The service's published ports.
    #[serde(default)]
    pub ports: Vec<crate::model::PortSpec>,
    pub command: Vec<String>,
    pub restart: bool,
    pub attachments: Vec<Attachment>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: Network,
    pub address: Ipv4Addr,
    /// The service's VIP on this network (endpoint mode vip).
    #[serde(default)]
    pub vip: Option<Ipv4Addr>,
    /// Extra names on this network (`--network name=…,alias=…`).
    #[serde(default)]
    pub aliases: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case")]
pub enum ApiRequest {
    NodeLs,
    JoinToken { role: String },
    NetworkCreate { spec: NetworkCreate },
    NetworkLs,
    NetworkInspect { name: String },
    NetworkRm { name: String },
    ServiceCreate { spec: ServiceCreate },
    ServiceLs,
    ServicePs { name: String },
    ServiceInspect { name: String },
    ServiceScale { name: String, replicas: i64 },
    ServiceRm { name: String },
    /// From an agent: a standalone task on the calling node.
    Run { spec: StandaloneCreate },
    /// From the CLI to its local daemon: run here, wait unless `detach`.
    RunLocal { spec: StandaloneCreate, detach: bool },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Reply {
    pub fn ok(data: serde_json::Value) -> Reply {
        Reply { ok: true, error: String::new(), data }
    }
    pub fn err(msg: impl std::fmt::Display) -> Reply {
        Reply { ok: false, error: msg.to_string(), data: serde_json::Value::Null }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn framing_round_trip_and_limits() {
        let mut buf = Vec::new();
        write_msg(&mut buf, &FromAgent::Heartbeat).await.expect("write");
        let mut r = buf.as_slice();
        let m: Option<FromAgent> = read_msg(&mut r).await.expect("read");
        assert!(matches!(m, Some(FromAgent::Heartbeat)));
        let m: Option<FromAgent> = read_msg(&mut r).await.expect("eof");
        assert!(m.is_none());

        let huge = (u32::try_from(MAX_FRAME).expect("fits") + 1).to_be_bytes();
        let mut r = &huge[..];
        assert!(matches!(read_msg::<_, FromAgent>(&mut r).await, Err(FrameError::TooLarge(_))));

        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"{{{{{");
        let mut r = garbage.as_slice();
        assert!(matches!(read_msg::<_, FromAgent>(&mut r).await, Err(FrameError::Decode(_))));
    }
}
