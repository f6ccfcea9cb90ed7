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
