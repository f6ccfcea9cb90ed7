//! A tower layer that counts every gRPC request by method and status code and times it, so
//! no handler carries metrics code.
//!
//! The status of a successful unary call is only known from the trailers, so the response
//! body is wrapped and the request is recorded when the trailers pass (or, for errors
//! returned before any message, from the `grpc-status` header). A body dropped before its
//! trailers is a client that went away: it is recorded as `Cancelled`.
//!
//! Every (method, code) counter is registered up front, so recording is an index and an
//! atomic add: no lock, no allocation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use metrics::{Counter, Histogram};
use tonic::Code;
use tower::{Layer, Service};

use super::names::{GRPC_DURATION, GRPC_REQUESTS, PIPELINE_OPS as OPS_METRIC, REQUESTS_SHED, VIA};
use super::Telemetry;
use crate::proto;

/// Our methods, labelled by name. Anything else (health, reflection, unknown paths) is
/// labelled `other`, so label cardinality stays fixed whatever clients send.
const METHODS: &[&str] = &[
    "Create",
    "Get",
    "Touch",
    "Update",
    "Regenerate",
    "Destroy",
    "ListUserSessions",
    "DestroyUserSessions",
    "GetMany",
    "Pipeline",
    "DestroyAllSessions",
    "other",
];

/// The operations a Pipeline stream carries, labelled by the name of their unary RPC, and
/// `none` for a request without an operation.
pub(crate) const PIPELINE_OPS: &[&str] = &[
    "Create",
    "Get",
    "Touch",
    "Update",
    "Regenerate",
    "Destroy",
    "ListUserSessions",
    "DestroyUserSessions",
    "none",
];

/// gRPC status codes 0..=16.
const CODES: usize = 17;

struct MethodMetrics {
    by_code: Vec<Counter>,
    duration: Histogram,
}

struct Table(Vec<MethodMetrics>);

impl Table {
    fn index(path: &str) -> usize {
        proto::method(path)
            .and_then(|m| METHODS.iter().position(|k| *k == m))
            .unwrap_or(METHODS.len() - 1)
    }

    fn record(&self, method: usize, code: Code, started: Instant) {
        let m = &self.0[method];
        let code = (code as usize).min(CODES - 1);
        m.by_code[code].increment(1);
        m.duration.record(started.elapsed().as_secs_f64());
    }
}

fn code_label(code: i32) -> String {
    match Code::from_i32(code) {
        Code::Ok => "OK".to_string(),
        other => format!("{other:?}"),
    }
}

/// Counts of what the gRPC edge refuses or carries beyond whole requests: requests shed at
/// `max_concurrent_requests` (unary, by method) and each operation of a Pipeline stream
/// (by operation and code, and shed). Every series is registered up front.
pub(crate) struct EdgeMetrics {
    shed_unary: Vec<Counter>,
    ops: Vec<Vec<Counter>>,
    shed_ops: Vec<Counter>,
}

impl EdgeMetrics {
    /// Handles that record nothing: for a service built without a registry (fuzzing).
    pub(crate) fn noop() -> Self {
        EdgeMetrics {
            shed_unary: METHODS.iter().map(|_| Counter::noop()).collect(),
            ops: PIPELINE_OPS
                .iter()
                .map(|_| (0..CODES).map(|_| Counter::noop()).collect())
                .collect(),
            shed_ops: PIPELINE_OPS.iter().map(|_| Counter::noop()).collect(),
        }
    }

    /// Counts a request to `path` shed before it reached its handler.
    pub(crate) fn shed_request(&self, path: &str) {
        self.shed_unary[Table::index(path)].increment(1);
    }

    /// Counts a pipelined operation (named as in [`PIPELINE_OPS`]) answered with `code`.
    pub(crate) fn pipelined(&self, op: &str, code: Code) {
        let code = (code as usize).min(CODES - 1);
        self.ops[op_index(op)][code].increment(1);
    }

    /// Counts a pipelined operation shed for want of a permit.
    pub(crate) fn shed_op(&self, op: &str) {
        self.shed_ops[op_index(op)].increment(1);
    }
}

fn op_index(op: &str) -> usize {
    PIPELINE_OPS
        .iter()
        .position(|k| *k == op)
        .unwrap_or(PIPELINE_OPS.len() - 1)
}

/// The layer. Build it with [`Telemetry::grpc_layer`].
#[derive(Clone)]
pub(crate) struct GrpcMetricsLayer {
    table: Arc<Table>,
}

impl Telemetry {
    /// The gRPC metrics layer, with every method and code registered.
    pub(crate) fn grpc_layer(&self) -> GrpcMetricsLayer {
        let table = self.register(|| {
            Table(
                METHODS
                    .iter()
                    .map(|&method| MethodMetrics {
                        by_code: (0..CODES as i32)
                            .map(|c| metrics::counter!(GRPC_REQUESTS, "method" => method, "code" => code_label(c)))
                            .collect(),
                        duration: metrics::histogram!(GRPC_DURATION, "method" => method),
                    })
                    .collect(),
            )
        });
        GrpcMetricsLayer {
            table: Arc::new(table),
        }
    }

    /// The edge's shed and pipelined-operation counters, every series registered.
    pub(crate) fn edge_metrics(&self) -> EdgeMetrics {
        self.register(|| EdgeMetrics {
            shed_unary: METHODS
                .iter()
                .map(|&m| metrics::counter!(REQUESTS_SHED, "method" => m, VIA => "unary"))
                .collect(),
            ops: PIPELINE_OPS
                .iter()
                .map(|&m| {
                    (0..CODES as i32)
                        .map(|c| {
                            metrics::counter!(OPS_METRIC, "method" => m, "code" => code_label(c), VIA => "pipeline")
                        })
                        .collect()
                })
                .collect(),
            shed_ops: PIPELINE_OPS
                .iter()
                .map(|&m| metrics::counter!(REQUESTS_SHED, "method" => m, VIA => "pipeline"))
                .collect(),
        })
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            table: self.table.clone(),
        }
    }
}

/// The service the layer wraps around the router.
#[derive(Clone)]
pub(crate) struct GrpcMetrics<S> {
    inner: S,
    table: Arc<Table>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = Table::index(req.uri().path());
        ResponseFuture {
            inner: self.inner.call(req),
            pending: Some(Pending {
                table: self.table.clone(),
                method,
                started: Instant::now(),
                done: false,
            }),
        }
    }
}

/// A request not yet recorded. Recorded as `Cancelled` if dropped unrecorded.
struct Pending {
    table: Arc<Table>,
    method: usize,
    started: Instant,
    done: bool,
}

impl Pending {
    fn finish(mut self, code: Code) {
        self.table.record(self.method, code, self.started);
        self.done = true;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.table
                .record(self.method, Code::Cancelled, self.started);
        }
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?;
    let n: i32 = std::str::from_utf8(v.as_bytes()).ok()?.parse().ok()?;
    Some(Code::from_i32(n))
}

pin_project_lite::pin_project! {
    /// The inner response future; it wraps the body once the headers are ready.
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<MeteredBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let pending = this.pending.take();
        Poll::Ready(result.map(|resp| {
            let mut pending = pending;
            if let Some(code) = status_of(resp.headers()) {
                // Trailers-only response: an error returned before any message.
                if let Some(p) = pending.take() {
                    p.finish(code);
                }
            }
            resp.map(|inner| MeteredBody { inner, pending })
        }))
    }
}

pin_project_lite::pin_project! {
    /// The response body, watched for its trailers.
    pub(crate) struct MeteredBody<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(code) = f.trailers_ref().and_then(status_of) {
                    if let Some(p) = this.pending.take() {
                        p.finish(code);
                    }
                }
            }
            Some(Err(_)) => {
                if let Some(p) = this.pending.take() {
                    p.finish(Code::Internal);
                }
            }
            None => {
                if let Some(p) = this.pending.take() {
                    // Ended without a status: only a broken server does this.
                    p.finish(Code::Unknown);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
