//! The daemons' HTTP endpoints (issue 21): `--metrics-addr` and `--docker-api`. hyper's
//! HTTP/1.1 on a TCP or unix listener, each connection admitted by the shared loop (ADR
//! 0019: bounded in all and per address, accept errors backed off).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use swarmnet_types::admission::{self, Admission, Limits, Names};
use tracing::{debug, info};

pub type Body = Full<Bytes>;
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync>;

/// Where an endpoint listens: `tcp://ADDR:PORT` (or `ADDR:PORT`) or `unix:///PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            if !p.starts_with('/') {
                return Err(format!("{s:?}: expected unix:///absolute/path"));
            }
            return Ok(Endpoint::Unix(p.into()));
        }
        let a = s.strip_prefix("tcp://").unwrap_or(s);
        a.parse().map(Endpoint::Tcp).map_err(|_| format!("{s:?}: expected ADDR:PORT, tcp://ADDR:PORT or unix:///PATH"))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// A response with a body and its content type.
pub fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn serve_conn<S>(io: S, handler: Handler)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let h = handler.clone();
        async move { Ok::<_, Infallible>(h(req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new().header_read_timeout(Duration::from_secs(10)).timer(hyper_util::rt::TokioTimer::new()).serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        debug!(error = %e, "http connection ended");
    }
}

/// Binds `at` (a unix socket replaces a stale file, and is made 0660) and serves until the
/// daemon exits.
pub async fn serve(at: Endpoint, what: &'static str, limits: Limits, handler: Handler) -> anyhow::Result<()> {
    let names = Names { what, conns: "connections", conn: "connection" };
    match &at {
        Endpoint::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("{what}: bind {at}"))?;
            info!(listen = %at, "{what} serving");
            admission::serve(l, names, Admission::new(limits), move |s: tokio::net::TcpStream, _| serve_conn(s, handler.clone())).await;
        }
        Endpoint::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path).with_context(|| format!("{what}: bind {at}"))?;
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).with_context(|| format!("{what}: chmod {}", path.display()))?;
            }
            info!(listen = %at, "{what} serving");
            admission::serve(l, names, Admission::new(limits), move |s: tokio::net::UnixStream, _| serve_conn(s, handler.clone())).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_as_docker_writes_them() {
        assert_eq!("127.0.0.1:9323".parse::<Endpoint>(), Ok(Endpoint::Tcp("127.0.0.1:9323".parse().expect("addr"))));
        assert_eq!("tcp://10.0.0.1:2375".parse::<Endpoint>(), Ok(Endpoint::Tcp("10.0.0.1:2375".parse().expect("addr"))));
        assert_eq!("unix:///run/swarmnet/docker.sock".parse::<Endpoint>(), Ok(Endpoint::Unix("/run/swarmnet/docker.sock".into())));
        assert!("unix://relative".parse::<Endpoint>().is_err());
        assert!("localhost".parse::<Endpoint>().is_err());
    }
}
