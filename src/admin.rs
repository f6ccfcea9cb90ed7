//! The admin HTTP endpoint: `/metrics` for Prometheus, `/healthz` (the process is up) and
//! `/readyz` (it accepts traffic; flips at shutdown together with gRPC health).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::observe::Telemetry;
use crate::tenant::Tenants;
use crate::tls::{Port, ReloadableTls};
use crate::transport::{incoming, Conn};

#[derive(Clone)]
struct Admin {
    telemetry: Telemetry,
    tenants: Arc<Tenants>,
    ready: Arc<AtomicBool>,
}

/// Connections the admin endpoint holds open at once.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Serves (over TLS when `tls` is set) until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: Option<(Arc<ReloadableTls>, Port)>,
    telemetry: Telemetry,
    tenants: Arc<Tenants>,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Admin {
            telemetry,
            tenants,
            ready,
        });
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
        }
        Some(tls) => {
            let local = listener.local_addr()?;
            let metrics = crate::transport::ConnMetrics::untracked();
            let conns = incoming(listener, Some(tls), MAX_ADMIN_CONNECTIONS, metrics);
            axum::serve(TlsListener { conns, local }, app)
                .with_graceful_shutdown(stopped)
                .await
        }
    }
}

/// The admin port's TLS connections, as axum accepts them.
struct TlsListener {
    conns: tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = Conn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Conn, std::net::SocketAddr) {
        use tokio_stream::StreamExt;
        loop {
            match self.conns.next().await {
                Some(Ok(conn)) => {
                    let peer = conn.peer().unwrap_or(self.local);
                    return (conn, peer);
                }
                Some(Err(_)) => continue,
                // The accept loop only ends with this listener: nothing more will come.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        Ok(self.local)
    }
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        a.telemetry.render(&a.tenants),
    )
}

async fn readyz(State(a): State<Admin>) -> impl IntoResponse {
    if !a.ready.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_string(),
        );
    }
    // A failing disk keeps the node ready, since reads are still served; the body says
    // which tenants refuse writes and why.
    let mut body = String::from("ready\n");
    for t in a.tenants.all() {
        if let Err(e) = t.store.check_writable() {
            body.push_str(&format!("writes refused (tenant {}): {e}\n", t.name));
        }
    }
    (StatusCode::OK, body)
}

/// GETs `path` from an admin endpoint (`host:port` or `http://host:port`) and returns the body
/// of a successful reply; the error says why not. For the command-line tools.
pub async fn fetch(addr: &str, path: &str, timeout: std::time::Duration) -> Result<String, String> {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let base = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let uri: axum::http::Uri = format!("{base}{path}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = async {
        let resp = client.get(uri).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(timeout, get)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// A value from a Prometheus text exposition. `name` with labels (`m{a="b"}`, as written
/// there) is that one series; a bare metric name is the sum of all its series (across
/// tenants, say). `None` when no series matches.
pub fn sample(exposition: &str, name: &str) -> Option<f64> {
    let series = exposition.lines().filter(|l| !l.starts_with('#'));
    if name.contains('{') {
        return series
            .into_iter()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok());
    }
    let values: Vec<f64> = series
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.rsplit_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::sample;

    #[test]
    fn a_bare_name_sums_its_series_and_a_labelled_one_is_exact() {
        let text = "# HELP m help\nm{tenant=\"a\"} 2\nm{tenant=\"b\"} 3\nm_total 7\nn 1.5\n";
        assert_eq!(sample(text, "m"), Some(5.0));
        assert_eq!(sample(text, "m{tenant=\"b\"}"), Some(3.0));
        assert_eq!(sample(text, "m_total"), Some(7.0));
        assert_eq!(sample(text, "n"), Some(1.5));
        assert_eq!(sample(text, "missing"), None);
    }
}
