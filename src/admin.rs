//! The admin HTTP endpoint: `/metrics` for Prometheus, `/healthz` (the process is up) and
//! `/readyz` (it accepts traffic; flips at shutdown together with gRPC health).
//!
//! It has its own connection cap and header-read timeout, apart from the gRPC port's: idle
//! sockets here are closed after `admin_header_read_timeout` and cannot pile up until they use
//! up the file descriptors that gRPC's `accept` needs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;

use crate::observe::{ConnMetrics, Telemetry};
use crate::tenant::Tenants;
use crate::tls::{Port, ReloadableTls};
use crate::transport::{incoming, Accept, Connections};

#[derive(Clone)]
struct Admin {
    telemetry: Telemetry,
    tenants: Arc<Tenants>,
    ready: Arc<AtomicBool>,
}

/// How long the endpoint waits at shutdown for requests in progress before it closes their
/// connections.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// How the admin port takes connections.
pub struct Limits {
    /// TLS (`admin_tls`), if on.
    pub tls: Option<(Arc<ReloadableTls>, Port)>,
    /// `admin_max_connections`.
    pub max_connections: usize,
    /// `handshake_timeout`, for the TLS handshake.
    pub handshake_timeout: Duration,
    /// `admin_header_read_timeout`.
    pub header_read_timeout: Duration,
}

/// Serves until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    limits: Limits,
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
    let mut conns = incoming(
        listener,
        Accept {
            tls: limits.tls,
            max_connections: limits.max_connections,
            handshake_timeout: limits.handshake_timeout,
            http2_preface: false,
            metrics: ConnMetrics::noop(),
        },
        Connections::new(),
    );
    let mut http = hyper::server::conn::http1::Builder::new();
    // The timer is what makes hyper enforce the header-read timeout; it runs from when the
    // connection opens and again from the end of each response (keep-alive).
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut tasks = JoinSet::new();
    loop {
        let conn = tokio::select! {
            c = conns.next() => c,
            // Reap finished connections as they end, so the set stays as small as the cap.
            Some(_) = tasks.join_next() => continue,
            _ = stop.wait_for(|s| *s) => break,
        };
        let conn = match conn {
            Some(Ok(conn)) => conn,
            Some(Err(_)) => continue,
            None => break,
        };
        let served =
            http.serve_connection(TokioIo::new(conn), TowerToHyperService::new(app.clone()));
        let mut stop = stop.clone();
        tasks.spawn(async move {
            tokio::pin!(served);
            tokio::select! {
                result = served.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "admin connection ended with an error");
                    }
                    return;
                }
                _ = stop.wait_for(|s| *s) => served.as_mut().graceful_shutdown(),
            }
            let _ = served.await;
        });
    }
    drop(conns);
    let drained = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_DEADLINE, drained).await.is_err() {
        // Dropping a connection's task closes its socket.
        tasks.shutdown().await;
    }
    Ok(())
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        a.telemetry
            .render(a.tenants.all().iter().map(|t| (&*t.name, t.store.stats()))),
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
