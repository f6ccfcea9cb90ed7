//! The gRPC port's connections, below the handlers.
//!
//! - [`incoming`] accepts connections up to `max_connections` (past it a new one is closed at
//!   once and counted), completes TLS handshakes off the accept loop, and wraps each
//!   connection with its [`ConnInfo`]: peer address, verified client certificates and the
//!   connection's own unauthenticated-request budget. A connection that has not finished its
//!   handshake and sent the HTTP/2 preface within `handshake_timeout` is closed, so sockets
//!   that never speak cannot hold the connection slots.
//! - [`Connections`] knows every connection yielded to a server, so shutdown can cut the ones
//!   still open after the drain and wait until they are gone before the logs close.
//! - [`AuthLayer`] gives every request its tenant from its credentials, before the body is
//!   read. A SessionStore call without valid credentials is refused from its headers;
//!   health checks and reflection pass with their bodies capped at
//!   `max_unauthenticated_message_bytes`. A connection that spends its
//!   `unauthenticated_requests` is closed.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::transport::server::Connected;
use tonic::Status;
use tower::{Layer, Service};

use crate::lock;
use crate::observe::ConnMetrics;
use crate::proto;
use crate::tenant::Tenants;
use crate::tls::{Port, ReloadableTls};

/// Accepted connections waiting for the server to pick them up.
const ACCEPT_BACKLOG: usize = 128;

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The path prefix of gRPC health checks: never counted against a connection's budget, so
/// a load balancer's health checker on a long-lived connection is never cut off.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// What a handler may know about the connection a request came on.
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The verified client certificate chain (leaf first), under mutual TLS.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    state: Arc<ConnState>,
}

#[derive(Debug, Default)]
struct ConnState {
    unauthenticated: AtomicU32,
    /// Spent its unauthenticated budget: reads end (EOF).
    closed: AtomicBool,
    /// Cut at shutdown: reads and writes fail.
    cut: AtomicBool,
    /// The task serving the connection, woken when it is cut.
    waker: AtomicWaker,
}

impl ConnState {
    /// The error of a cut connection, if it has been cut.
    fn cut_error(&self) -> Option<io::Error> {
        self.cut.load(Ordering::Acquire).then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed at shutdown",
            )
        })
    }

    /// `polled`, the outcome of an IO call, unless it is waiting and the connection has been
    /// cut. A waiting task is registered before the check, so a cut that lands after it still
    /// wakes the task (only waiting tasks need this: a running one checks at its next call).
    fn unless_cut<T>(&self, cx: &Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            return polled;
        }
        self.waker.register(cx.waker());
        match self.cut_error() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Pending,
        }
    }
}

/// A plaintext or TLS connection.
pub(crate) type Io = Either<TcpStream, TlsStream<TcpStream>>;

/// An accepted connection. It holds one of `max_connections` until it is dropped; reads end
/// (EOF) once it has been closed for spending its unauthenticated budget, and reads and
/// writes fail once [`Connections::cut`] has cut it.
pub(crate) struct Conn {
    io: Io,
    /// Bytes read during the handshake (the HTTP/2 preface), served again before `io`.
    replay: Bytes,
    info: ConnInfo,
    metrics: ConnMetrics,
    tracked: Tracked,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.metrics.open.decrement(1.0);
        self.tracked.release();
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
        let this = &mut *self;
        let state = &this.info.state;
        if let Some(e) = state.cut_error() {
            return Poll::Ready(Err(e));
        }
        if state.closed.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        state.unless_cut(cx, polled)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.info.state.cut_error() {
            return Poll::Ready(Err(e));
        }
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.info.state.unless_cut(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.info.state.cut_error() {
            return Poll::Ready(Err(e));
        }
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.info.state.unless_cut(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.info.state.cut_error() {
            return Poll::Ready(Err(e));
        }
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.info.state.unless_cut(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The connections of one port that a server has been given, so that shutdown can close the
/// ones still open after the drain: a server that stops accepting (or whose task is aborted)
/// still serves its established connections, each in its own task, until they are cut.
#[derive(Clone, Default)]
pub(crate) struct Connections {
    shared: Arc<Registry>,
}

#[derive(Default)]
struct Registry {
    live: Mutex<HashMap<u64, Arc<ConnState>>>,
    next: AtomicU64,
    /// Notified when `live` becomes empty.
    emptied: Notify,
    /// Cancelled by [`Connections::cut`]: also ends the accept loop and pending handshakes.
    cut: CancellationToken,
}

/// A connection's entry in its [`Connections`], removed when the connection is dropped.
struct Tracked {
    registry: Arc<Registry>,
    id: u64,
}

impl Tracked {
    fn release(&self) {
        let mut live = lock(&self.registry.live);
        live.remove(&self.id);
        if live.is_empty() {
            self.registry.emptied.notify_waiters();
        }
    }
}

impl Connections {
    /// An empty set.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn track(&self, state: Arc<ConnState>) -> Tracked {
        let id = self.shared.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.live).insert(id, state);
        Tracked {
            registry: self.shared.clone(),
            id,
        }
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        lock(&self.shared.live).len()
    }

    /// Makes every open connection's reads and writes fail, waking the tasks that serve them
    /// so they end; stops accepting and abandons pending handshakes. Returns how many
    /// connections were open.
    pub(crate) fn cut(&self) -> usize {
        self.shared.cut.cancel();
        let live = lock(&self.shared.live);
        for state in live.values() {
            state.cut.store(true, Ordering::Release);
            state.waker.wake();
        }
        live.len()
    }

    /// Waits until no connection is open.
    pub(crate) async fn closed(&self) {
        loop {
            let emptied = self.shared.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            emptied.await;
        }
    }
}

/// How [`incoming`] accepts connections.
pub(crate) struct Accept {
    /// TLS for this port, if on.
    pub tls: Option<(Arc<ReloadableTls>, Port)>,
    /// Connections open at once, those still in their handshake included.
    pub max_connections: usize,
    /// The time a new connection has to finish its TLS handshake and, with `http2_preface`,
    /// send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// The port speaks only HTTP/2: wait for the client's preface before handing the
    /// connection on.
    pub http2_preface: bool,
    /// Where the port's connections are counted.
    pub metrics: ConnMetrics,
}

/// Accepts connections on `listener` as `accept` says, and yields them to the server, each
/// tracked in `connections`. Ends when the server drops the stream or `connections` is cut.
pub(crate) fn incoming(
    listener: TcpListener,
    accept: Accept,
    connections: Connections,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    let Accept {
        tls,
        max_connections,
        handshake_timeout,
        http2_preface,
        metrics,
    } = accept;
    let slots = Arc::new(Semaphore::new(max_connections));
    let cut = connections.shared.cut.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
                _ = cut.cancelled() => return,
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
            let (tx, metrics, connections) = (tx.clone(), metrics.clone(), connections.clone());
            let acceptor = tls.as_ref().map(|(t, port)| t.acceptor(*port));
            // Off the accept loop: a slow client holds only its own task, and only until the
            // deadline.
            tokio::spawn(async move {
                let handshake = handshake(tcp, acceptor, http2_preface);
                let (io, certs, replay) = tokio::select! {
                    done = tokio::time::timeout(handshake_timeout, handshake) => match done {
                        Ok(Ok(done)) => done,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "connection closed during its handshake");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, ?handshake_timeout, "connection closed: handshake not finished within handshake_timeout");
                            return;
                        }
                    },
                    _ = connections.shared.cut.cancelled() => return,
                };
                let state = Arc::<ConnState>::default();
                metrics.open.increment(1.0);
                let conn = Conn {
                    io,
                    replay,
                    info: ConnInfo {
                        remote: Some(peer),
                        certs,
                        state: state.clone(),
                    },
                    metrics,
                    tracked: connections.track(state),
                    _permit: permit,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The verified client certificate chain, if any.
type Certs = Option<Arc<Vec<CertificateDer<'static>>>>;

/// Completes the TLS handshake (with `acceptor`) and, with `http2_preface`, reads the client's
/// HTTP/2 preface, which comes back to be served again to the server.
async fn handshake(
    tcp: TcpStream,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    http2_preface: bool,
) -> io::Result<(Io, Certs, Bytes)> {
    let (mut io, certs) = match acceptor {
        None => (Either::Left(tcp), None),
        Some(acceptor) => {
            let stream = acceptor.accept(tcp).await?;
            let certs = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.to_vec()));
            (Either::Right(stream), certs)
        }
    };
    if !http2_preface {
        return Ok((io, certs, Bytes::new()));
    }
    let mut preface = [0u8; HTTP2_PREFACE.len()];
    let mut got = 0;
    while got < preface.len() {
        let n = io.read(&mut preface[got..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // A client that sends anything else is refused at once, without waiting for more.
        if preface[got..got + n] != HTTP2_PREFACE[got..got + n] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an HTTP/2 client preface",
            ));
        }
        got += n;
    }
    // It matched: serve the server the same bytes.
    Ok((io, certs, Bytes::from_static(HTTP2_PREFACE)))
}

/// The authentication layer. See the module docs.
#[derive(Clone)]
pub(crate) struct AuthLayer {
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
    pub(crate) fn new(
        tenants: Arc<Tenants>,
        budget: u32,
        max_body: usize,
        metrics: ConnMetrics,
    ) -> Self {
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
pub(crate) struct Auth<S> {
    inner: S,
    shared: Arc<AuthShared>,
}

pin_project! {
    /// The inner call, or an answer without one.
    // pin_project_lite takes no docs on variant fields; the variants' docs say what they hold.
    #[allow(missing_docs)]
    #[project = AuthFutureProj]
    pub(crate) enum AuthFuture<F> {
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
                // A call of the sessions API needs a tenant.
                let api = proto::method(path).is_some();
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
