//! Forwarding names that are not the cluster's to the node's upstream resolvers, from the
//! daemon's (the node's) namespace. The query goes out byte for byte and the answer comes
//! back as the upstream gave it; the whole attempt is bounded by one configurable timeout.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver is configured (node resolv.conf has none and no --dns was given)")]
    NoUpstream,
    #[error("upstream {upstream}: no answer within {ms} ms")]
    Timeout { upstream: SocketAddr, ms: u128 },
    #[error("upstream {upstream}: {source}")]
    Io {
        upstream: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {upstream}: answer of {len} bytes is not a DNS message for this query")]
    Bad { upstream: SocketAddr, len: usize },
}

#[derive(Clone, Debug)]
pub struct Forwarder {
    pub upstreams: Vec<SocketAddr>,
    /// For the whole query, across all upstreams (tried in order, each with an equal share
    /// of what is left). A refused port moves on at once.
    pub timeout: Duration,
}

impl Forwarder {
    /// Sends `query` (a whole DNS message) upstream over UDP, or TCP if `tcp`, and returns
    /// the first answer carrying the query's id.
    pub async fn forward(&self, query: &[u8], tcp: bool) -> Result<Vec<u8>, ForwardError> {
        let Some(first) = self.upstreams.first() else {
            return Err(ForwardError::NoUpstream);
        };
        let deadline = Instant::now() + self.timeout;
        let mut last = ForwardError::Timeout { upstream: *first, ms: self.timeout.as_millis() };
        let n = self.upstreams.len();
        for (i, up) in self.upstreams.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let share = left / u32::try_from(n - i).unwrap_or(1);
            type Attempt<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, ForwardError>> + Send + 'a>>;
            let attempt: Attempt<'_> = if tcp { Box::pin(Self::tcp(*up, query)) } else { Box::pin(Self::udp(*up, query)) };
            match timeout(share, attempt).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => last = e,
                Err(_) => last = ForwardError::Timeout { upstream: *up, ms: share.as_millis() },
            }
        }
        Err(last)
    }

    async fn udp(up: SocketAddr, query: &[u8]) -> Result<Vec<u8>, ForwardError> {
        let io = |source| ForwardError::Io { upstream: up, source };
        let local: SocketAddr = if up.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let sock = UdpSocket::bind(local).await.map_err(io)?;
        sock.connect(up).await.map_err(io)?;
        sock.send(query).await.map_err(io)?;
        let mut buf = vec![0u8; 65535];
        loop {
            let len = sock.recv(&mut buf).await.map_err(io)?;
            // Another id is a stray or forged answer: keep waiting for ours.
            if len >= 12 && buf[..2] == query[..2] {
                buf.truncate(len);
                return Ok(buf);
            }
        }
    }

    async fn tcp(up: SocketAddr, query: &[u8]) -> Result<Vec<u8>, ForwardError> {
        let io = |source| ForwardError::Io { upstream: up, source };
        let mut s = TcpStream::connect(up).await.map_err(io)?;
        let len = u16::try_from(query.len()).map_err(|_| ForwardError::Bad { upstream: up, len: query.len() })?;
        let mut msg = Vec::with_capacity(query.len() + 2);
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(query);
        s.write_all(&msg).await.map_err(io)?;
        let mut lb = [0u8; 2];
        s.read_exact(&mut lb).await.map_err(io)?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(lb))];
        s.read_exact(&mut buf).await.map_err(io)?;
        if buf.len() < 12 || buf[..2] != query[..2] {
            return Err(ForwardError::Bad { upstream: up, len: buf.len() });
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_upstream_and_a_refused_one_fail_fast() {
        let f = Forwarder { upstreams: vec![], timeout: Duration::from_secs(2) };
        assert!(matches!(f.forward(&[0u8; 12], false).await, Err(ForwardError::NoUpstream)));
        // A port nobody listens on: ICMP port unreachable on loopback ends it at once.
        let free = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = free.local_addr().expect("addr");
        drop(free);
        let f = Forwarder { upstreams: vec![addr], timeout: Duration::from_secs(5) };
        let t = std::time::Instant::now();
        let r = f.forward(&[1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], false).await;
        assert!(matches!(r, Err(ForwardError::Io { .. })), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(5), "did not wait for the timeout");
    }

    #[tokio::test]
    async fn silent_upstream_times_out_and_the_next_one_answers() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let good = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let good_addr = good.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            if let Ok((n, from)) = good.recv_from(&mut buf).await {
                // A stray answer with another id first, then the real one.
                let mut stray = buf[..n].to_vec();
                stray[0] ^= 0xff;
                let _ = good.send_to(&stray, from).await;
                let _ = good.send_to(&buf[..n], from).await;
            }
        });
        let f = Forwarder { upstreams: vec![silent.local_addr().expect("addr"), good_addr], timeout: Duration::from_millis(600) };
        let q = [7, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(f.forward(&q, false).await.expect("answer from the second upstream"), q.to_vec());
        let f = Forwarder { upstreams: vec![silent.local_addr().expect("addr")], timeout: Duration::from_millis(200) };
        assert!(matches!(f.forward(&q, false).await, Err(ForwardError::Timeout { .. })));
    }
}
