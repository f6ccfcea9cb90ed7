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
use crate::store::Store;

#[derive(Clone)]
struct Admin {
    telemetry: Telemetry,
    store: Store,
    ready: Arc<AtomicBool>,
}

/// Serves until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    telemetry: Telemetry,
    store: Store,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Admin {
            telemetry,
            store,
            ready,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        a.telemetry.render(&a.store),
    )
}

async fn readyz(State(a): State<Admin>) -> impl IntoResponse {
    if a.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    }
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

/// The value of one sample in a Prometheus text exposition: `name` as written there,
/// labels included.
pub fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
