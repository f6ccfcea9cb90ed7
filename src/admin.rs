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
pub(crate) struct Limits {
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
pub(crate) async fn serve(
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
