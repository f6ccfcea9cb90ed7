//! Routing without a smart client: in a replicated group, any node accepts any call of the
//! session store, and a node that does not lead passes it to the one that does.
//!
//! The call goes on as it came, over one long-lived HTTP/2 connection per leader: same path,
//! same metadata (so the leader authenticates it again and applies its own deadline), and
//! the body streamed both ways, so a Pipeline stream is forwarded whole. Every reply carries
//! the leader's client address in [`LEADER_HEADER`], so a client that wants to can go there
//! directly next time. A call that reaches a node that does not lead, after a forward
//! already, is refused rather than forwarded again: two nodes that disagree for a moment
//! about who leads must not pass a call back and forth.
//!
//! Health, reflection and the admin calls are never forwarded: they describe this node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;
use tower::{Layer, Service, ServiceExt as _};

use crate::proto::SERVICE_NAME;

/// Response metadata naming the leader's client address (`host:port`), on every reply of the
/// session store in a group.
pub const LEADER_HEADER: &str = "sessiond-leader";

/// Request metadata a node adds to a call it forwards.
pub const FORWARDED_HEADER: &str = "sessiond-forwarded";

/// Where a call of the session store is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// This node leads: serve it here. Carries this node's client address.
    Here(SocketAddr),
    /// Another node leads: forward it there (its client address).
    Leader(SocketAddr),
    /// No leader is known: the group is electing one, or this node cannot reach a quorum.
    NoLeader,
}

/// Who leads now, as this node sees it.
pub trait Leadership: Send + Sync + 'static {
    /// The route for a call arriving now.
    fn route(&self) -> Route;
}

/// Forwards the session store's calls to the leader (see the module docs).
#[derive(Clone)]
pub struct ForwardLayer {
    shared: Arc<Shared>,
}

struct Shared {
    leadership: Arc<dyn Leadership>,
    /// One lazily connected channel per leader address.
    channels: Mutex<HashMap<SocketAddr, Channel>>,
    /// The path prefix of the calls this layer routes.
    prefix: String,
}

impl ForwardLayer {
    /// Routes by what `leadership` says at each call.
    pub fn new(leadership: Arc<dyn Leadership>) -> Self {
        ForwardLayer {
            shared: Arc::new(Shared {
                leadership,
                channels: Mutex::new(HashMap::new()),
                prefix: format!("/{SERVICE_NAME}/"),
            }),
        }
    }
}

impl<S> Layer<S> for ForwardLayer {
    type Service = Forward<S>;

    fn layer(&self, inner: S) -> Forward<S> {
        Forward {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`ForwardLayer`] makes.
#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl Shared {
    fn channel(&self, leader: SocketAddr) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(&leader) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{leader}"))
            .map_err(|e| Status::internal(format!("the leader's address {leader}: {e}")))?
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        channels.insert(leader, channel.clone());
        Ok(channel)
    }
}

impl<S, E> Service<Request<Body>> for Forward<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = E> + Clone + Send + 'static,
    S::Future: Send + 'static,
    E: Send + 'static,
{
    type Response = Response<Body>;
    type Error = E;
    type Future = BoxFuture<'static, Result<Response<Body>, E>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        if !req.uri().path().starts_with(&self.shared.prefix) {
            return Box::pin(self.inner.call(req));
        }
        let route = self.shared.leadership.route();
        let leader = match route {
            Route::Here(me) => {
                let served = self.inner.call(req);
                return Box::pin(async move { Ok(with_leader(served.await?, me)) });
            }
            Route::Leader(addr) => addr,
            Route::NoLeader => return refused(no_leader()),
        };
        if req.headers().contains_key(FORWARDED_HEADER) {
            return refused(Status::unavailable(format!(
                "this node does not lead the group and the call was already forwarded once; \
                 the leader is {leader}: retry there or shortly"
            )));
        }
        let channel = match self.shared.channel(leader) {
            Ok(c) => c,
            Err(status) => return refused(status),
        };
        req.headers_mut()
            .insert(FORWARDED_HEADER, HeaderValue::from_static("1"));
        Box::pin(async move {
            let forwarded = match channel.oneshot(req).await {
                Ok(response) => response,
                Err(e) => Status::unavailable(format!(
                    "this node does not lead the group and could not reach the leader at \
                     {leader}: {e}"
                ))
                .into_http(),
            };
            Ok(with_leader(forwarded, leader))
        })
    }
}

/// The status of a call no node can serve now.
fn no_leader() -> Status {
    Status::unavailable(
        "no leader: the group is electing one or this node cannot reach a quorum; retry shortly",
    )
}

/// A refusal, as the reply to the call.
fn refused<E: Send + 'static>(status: Status) -> BoxFuture<'static, Result<Response<Body>, E>> {
    Box::pin(std::future::ready(Ok(status.into_http())))
}

/// Adds the leader's address to a reply's metadata.
fn with_leader(mut response: Response<Body>, leader: SocketAddr) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(&leader.to_string()) {
        response.headers_mut().insert(LEADER_HEADER, v);
    }
    response
}
