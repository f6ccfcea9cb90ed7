//! The gRPC port's connections, below the handlers.
//!
//! - [`incoming`] accepts connections up to `max_connections` (past it a new one is closed at
//!   once and counted), completes TLS handshakes off the accept loop, and wraps each
//!   connection with its [`ConnInfo`]: peer address, verified client certificates and the
//!   connection's own unauthenticated-request budget.
//! - [`AuthLayer`] gives every request its tenant from its credentials, before the body is
//!   read. A SessionStore call without valid credentials is refused from its headers;
//!   health checks and reflection pass with their bodies capped at
//!   `max_unauthenticated_message_bytes`. A connection that spends its
//!   `unauthenticated_requests` is closed.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::{Counter, Gauge};
use pin_project_lite::pin_project;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tonic::body::Body;
use tonic::transport::server::Connected;
use tonic::Status;
use tower::{Layer, Service};

use crate::tenant::Tenants;
use crate::tls::{Port, ReloadableTls, HANDSHAKE_TIMEOUT};

/// Accepted connections waiting for the server to pick them up.
const ACCEPT_BACKLOG: usize = 128;

/// The path prefix of the sessions API: calls under it need a tenant.
const API_PREFIX: &str = "/sessiond.v1.SessionStore/";

/// The path prefix of gRPC health checks: never counted against a connection's budget, so
/// a load balancer's health checker on a long-lived connection is never cut off.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The connection metrics.
#[derive(Clone)]
pub struct ConnMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed at once because `max_connections` were open.
    pub refused: Counter,
    /// Requests refused for missing or wrong credentials.
    pub unauthenticated: Counter,
    /// Connections closed for spending their unauthenticated budget.
    pub closed_unauthenticated: Counter,
}

impl ConnMetrics {
    /// Metrics that go nowhere, for a port that does not report its connections.
    pub fn untracked() -> Self {
        ConnMetrics {
            open: Gauge::noop(),
            refused: Counter::noop(),
            unauthenticated: Counter::noop(),
            closed_unauthenticated: Counter::noop(),
        }
    }
}

/// What a handler may know about the connection a request came on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The verified client certificate chain (leaf first), under mutual TLS.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    state: Arc<ConnState>,
}

#[derive(Debug, Default)]
struct ConnState {
    unauthenticated: AtomicU32,
    closed: AtomicBool,
}

/// A plaintext or TLS connection.
pub type Io = Either<TcpStream, TlsStream<TcpStream>>;

/// An accepted connection. It holds one of `max_connections` until it is dropped, and reads
/// end (EOF) once it has been closed for spending its unauthenticated budget.
pub struct Conn {
    io: Io,
    info: ConnInfo,
    metrics: ConnMetrics,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    /// The peer's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.info.remote
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.metrics.open.decrement(1.0);
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.info.state.closed.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts connections on `listener` (with TLS for `port` when `tls` is set), at most
/// `max_connections` open at once, and yields them to the server. Ends when the server drops
/// the stream.
pub fn incoming(
    listener: TcpListener,
    tls: Option<(Arc<ReloadableTls>, Port)>,
    max_connections: usize,
    metrics: ConnMetrics,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of fds and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                metrics.refused.increment(1);
                tracing::debug!(%peer, max_connections, "connection refused: max_connections open");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (tx, metrics) = (tx.clone(), metrics.clone());
            let acceptor = tls.as_ref().map(|(t, port)| t.acceptor(*port));
            tokio::spawn(async move {
                let (io, certs) = match acceptor {
                    None => (Either::Left(tcp), None),
                    Some(acceptor) => {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                let certs = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .map(|c| Arc::new(c.to_vec()));
                                (Either::Right(stream), certs)
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                metrics.open.increment(1.0);
                let conn = Conn {
                    io,
                    info: ConnInfo {
                        remote: Some(peer),
                        certs,
                        state: Arc::default(),
                    },
                    metrics,
                    _permit: permit,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The authentication layer. See the module docs.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<AuthShared>,
}

struct AuthShared {
    tenants: Arc<Tenants>,
    budget: u32,
    max_body: usize,
    metrics: ConnMetrics,
}

impl AuthLayer {
    /// Authenticates against `tenants`; a connection may make `budget` requests without
    /// credentials, with bodies of at most `max_body` bytes.
    pub fn new(tenants: Arc<Tenants>, budget: u32, max_body: usize, metrics: ConnMetrics) -> Self {
        AuthLayer {
            shared: Arc::new(AuthShared {
                tenants,
                budget,
                max_body,
                metrics,
            }),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the router.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    shared: Arc<AuthShared>,
}

pin_project! {
    /// The inner call, or an answer without one.
    #[project = AuthFutureProj]
    pub enum AuthFuture<F> {
        /// Passed on.
        Inner { #[pin] future: F },
        /// Refused here.
        Refused { response: Option<http::Response<Body>> },
    }
}

impl<F, E> Future for AuthFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthFutureProj::Inner { future } => future.poll(cx),
            AuthFutureProj::Refused { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

impl<S, E> Service<http::Request<Body>> for Auth<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = E>,
{
    type Response = http::Response<Body>;
    type Error = E;
    type Future = AuthFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let s = &self.shared;
        // Borrowed, not cloned: this runs for every request.
        let certs = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.certs.as_deref());
        let authorization = req.headers().get(http::header::AUTHORIZATION);
        let verdict = s
            .tenants
            .authenticate(authorization.map(|v| v.as_bytes()), certs.map(|c| &c[..]))
            .cloned();
        match verdict {
            Ok(tenant) => {
                req.extensions_mut().insert(tenant);
            }
            Err(refusal) => {
                let path = req.uri().path();
                let api = path.starts_with(API_PREFIX);
                if !path.starts_with(HEALTH_PREFIX) {
                    if let Some(conn) = req.extensions().get::<ConnInfo>() {
                        self.spend(conn);
                    }
                }
                if api {
                    s.metrics.unauthenticated.increment(1);
                    let status = Status::from(refusal);
                    return AuthFuture::Refused {
                        response: Some(status.into_http()),
                    };
                }
                let max = s.max_body;
                req = req.map(|b| Body::new(http_body_util::Limited::new(b, max)));
            }
        }
        AuthFuture::Inner {
            future: self.inner.call(req),
        }
    }
}

impl<S> Auth<S> {
    /// Counts one request without credentials on `conn`, closing it past the budget.
    fn spend(&self, conn: &ConnInfo) {
        let spent = conn.state.unauthenticated.fetch_add(1, Ordering::Relaxed) + 1;
        if spent > self.shared.budget && !conn.state.closed.swap(true, Ordering::Relaxed) {
            self.shared.metrics.closed_unauthenticated.increment(1);
            tracing::warn!(
                peer = ?conn.remote,
                requests = spent,
                "closing a connection that keeps sending requests without valid credentials"
            );
        }
    }
}
